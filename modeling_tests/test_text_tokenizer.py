import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from waveclip_hf.data.text_tokenizer import build_word_level_tokenizer, clip_text_config_kwargs


CORPUS = [
    "a red star with vertical stripes and the glyph 7",
    "a blue circle with dots and the glyph A",
    "a photo of a {} shape",
]


def test_bos_eos_placement_and_lowercase():
    tokenizer = build_word_level_tokenizer(CORPUS, max_length=16)
    ids = tokenizer("A Red STAR, with dots")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    tokens = tokenizer.convert_ids_to_tokens(ids[1:-1])
    # Punctuation is split off; "," never appeared in the corpus, so it is <unk>.
    assert tokens == ["a", "red", "star", "<unk>", "with", "dots"]
    assert tokenizer.eos_token_id != 2


def test_padding_batch_is_right_padded():
    tokenizer = build_word_level_tokenizer(CORPUS, max_length=16)
    batch = tokenizer(["a red star", "a blue circle with dots"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 7)
    assert batch["input_ids"][0].tolist()[-2:] == [tokenizer.pad_token_id] * 2
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert batch["input_ids"][0, 4] == tokenizer.eos_token_id


def test_save_and_reload_with_auto_tokenizer(tmp_path):
    tokenizer = build_word_level_tokenizer(CORPUS, max_length=16)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ["a red star with the glyph 7", "a photo of a blue shape"]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.model_max_length == 16
    assert reloaded.padding_side == "right"
    assert clip_text_config_kwargs(reloaded) == clip_text_config_kwargs(tokenizer)


def test_clip_text_model_pools_at_eos():
    tokenizer = build_word_level_tokenizer(CORPUS, max_length=16)
    config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=16,
        **clip_text_config_kwargs(tokenizer),
    )
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    batch = tokenizer(["a red star", "a blue circle with dots"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    eos_positions = [4, 6]
    for row, position in enumerate(eos_positions):
        torch.testing.assert_close(out.pooler_output[row], out.last_hidden_state[row, position])
