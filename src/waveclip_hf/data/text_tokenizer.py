"""A small word-level text tokenizer trained offline, for CLIP text towers built here.

Real CLIP checkpoints ship a byte-level BPE tokenizer; this project's machines cannot
download one (docs/offline_benchmark.md). The generated benchmark has a closed vocabulary ("a red star with
vertical stripes and the glyph 7"), so a word-level tokenizer trained on its captions
and prompts is exact and tiny. It is returned as a `PreTrainedTokenizerFast`, so it
saves with `save_pretrained` and loads back with `AutoTokenizer.from_pretrained`
like any Hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast


PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Order fixes the ids: pad=0, unk=1, bos=2, eos=3. `CLIPTextTransformer` pools with
# argmax(input_ids) when eos_token_id == 2 (a legacy path for old OpenAI configs); eos=3
# keeps it on the "first eos position" path, which is correct for any vocabulary.
SPECIAL_TOKENS = [PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]


def build_word_level_tokenizer(texts: Iterable[str], max_length: int = 32) -> PreTrainedTokenizerFast:
    """Train a lowercase word-level tokenizer on `texts` and wrap it for transformers.

    Every encoded sequence is `<|startoftext|> w_1 ... w_n <|endoftext|>`; batches pad
    on the right with `<pad>`, and words never seen in training map to `<unk>`.

    Args:
        texts: the corpus (captions and zero-shot prompts); every word in it gets an id.
        max_length: `model_max_length` of the tokenizer, i.e. the CLIP text tower's
            `max_position_embeddings`. Counts the bos and eos tokens.

    Returns:
        A `PreTrainedTokenizerFast` whose `save_pretrained` folder loads offline with
        `AutoTokenizer.from_pretrained`.
    """
    tokenizer = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Whitespace() splits on \w+|[^\w\s]+, so "stripes," -> "stripes", ",".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    trainer = WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)

    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def clip_text_config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Keyword arguments that make a `CLIPTextConfig` match `tokenizer`.

    Returns `vocab_size`, `bos_token_id`, `eos_token_id`, `pad_token_id` and
    `max_position_embeddings` (= `tokenizer.model_max_length`).

    Raises:
        ValueError: if eos_token_id is 2, which `CLIPTextTransformer` treats as a legacy
            config and pools at argmax(input_ids) instead of at the eos token.
    """
    if tokenizer.eos_token_id == 2:
        raise ValueError(
            "eos_token_id == 2 makes CLIPTextTransformer pool at argmax(input_ids) instead of the eos "
            "position; give the eos token another id."
        )
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
    }
