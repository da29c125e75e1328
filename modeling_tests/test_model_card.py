"""The Hub folder a user uploads: no local path anywhere in it, a model card whose front matter the Hub reads
(licence, `model-index`, widget), accuracy filled in when an evaluation ran (`--eval-labelled-data`, or the main
job's per-axis figures), example labels the tokenizer knows, and the CLI flags that shape it (`--license`,
`--hub-private`, `--recipe`).

The module's run goes through the command line (`cli.distill.main`) as a user would: a local teacher, a local image
folder and a labelled folder, all under pytest's temporary folder, whose path must then appear nowhere in `final/`.
"""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reset_accelerate_state
from conftest import tiny_config as tiny_student_config
from huggingface_hub import ModelCard
from PIL import Image
from test_distillation import PYTHON, cli_args, make_images, make_teacher, subprocess_env, tiny_config
from test_end_to_end import known_answer_embeddings, tiny_clip_config
from transformers import AutoTokenizer

from waveclip_hf.data.synthetic import AXES
from waveclip_hf.experiments.run_evaluation import card_results, evaluate
from waveclip_hf.hub.front_matter import example_labels, resolve_license, tokenizes_without_unknown
from waveclip_hf.training.config import RECIPES, DistillationConfig
from waveclip_hf.training.outputs import DistillationResult, rewrite_model_card


# The tiny teacher's tokenizer knows these words (test_distillation.PROMPTS); the labelled folder uses them as labels.
LABELLED_CLASSES = {"square": "class0", "circle": "class1", "stripes": "class2", "noise": "class3"}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """The command line (`cli.distill.main`, in this process) with a local teacher and `--eval-labelled-data`:
    (tmp root, output folder)."""
    from waveclip_hf.cli.distill import main

    root = tmp_path_factory.mktemp("card")
    teacher, images = make_teacher(root / "teacher"), make_images(root / "images", 40)
    for label, kind in LABELLED_CLASSES.items():  # one subfolder per class, named by its label
        shutil.copytree(images / kind, root / "labelled" / label)
    (root / "labelled" / "noise" / "broken.png").write_bytes(b"not an image")
    config = tiny_config(teacher, images, root / "run", max_steps=4, num_workers=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate_state()
    try:
        assert (
            main(
                [
                    *cli_args(config),
                    "--eval-labelled-data",
                    str(root / "labelled"),
                    "--eval-prompt-template",
                    "a photo of a {}",
                ]
            )
            == 0
        )
    finally:
        reset_accelerate_state()
        torch.set_num_threads(threads)
    return root, root / "run"


def test_no_file_of_the_saved_folder_names_a_local_path(distilled):
    root, run = distilled
    files = sorted(p for p in (run / "final").rglob("*") if p.is_file())
    assert {"README.md", "tokenizer_config.json", "config.json", "preprocessor_config.json"} <= {p.name for p in files}
    for path in files:  # every file, the weights' JSON header included
        data = path.read_bytes()
        for forbidden in (str(root).encode(), str(root.resolve()).encode(), b"is_local", b"local_files_only"):
            assert forbidden not in data, (path.name, forbidden)
    card = (run / "final" / "README.md").read_text()
    assert "`teacher` (a local folder)" in card and "`images` (a local folder)" in card
    assert 'AutoModel.from_pretrained("your-username/run", trust_remote_code=True)' in card
    tokenizer_config = json.loads((run / "final" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] and tokenizer_config["model_max_length"] == 16


def test_the_card_publishes_the_labelled_evaluation_in_a_model_index_the_hub_reads(distilled):
    _, run = distilled
    summary = json.loads((run / "summary.json").read_text())
    (task,) = summary["zero_shot"]
    assert (task["task"], task["num_images"], task["num_skipped"]) == ("labelled", 40, 1)
    assert task["class_names"] == sorted(LABELLED_CLASSES) and task["prompt_template"] == "a photo of a {}"
    assert len(task["stage_accuracy"]) == 2 and all(0 <= a <= 1 for a in task["stage_accuracy"])

    card = (run / "final" / "README.md").read_text()
    meta = front_matter(card)
    (model,) = meta["model-index"]
    assert model["name"] == "waveclip-teacher"
    (result,) = model["results"]
    assert result["task"] == {"type": "zero-shot-image-classification", "name": "Zero-shot image classification"}
    assert result["dataset"] == {"type": "imagefolder", "name": "image folder `labelled`"}
    assert [m["type"] for m in result["metrics"]] == ["accuracy", "accuracy"]
    assert [m["value"] for m in result["metrics"]] == [
        round(task["stage_accuracy"][1], 4),
        round(task["stage_accuracy"][0], 4),
    ]
    assert all(m["name"].startswith("Top-1 accuracy") for m in result["metrics"])
    parsed = ModelCard(card).data  # huggingface_hub's reader, as the Hub parses the card
    assert [r.metric_value for r in parsed.eval_results] == [m["value"] for m in result["metrics"]]
    assert parsed.pipeline_tag == "zero-shot-image-classification" and parsed.library_name == "transformers"
    # The Accuracy section: stage and teacher columns in percent.
    row = next(line for line in card.splitlines() if line.startswith("| labelled |"))
    assert f"{100 * task['stage_accuracy'][0]:.1f}%" in row and f"{100 * task['teacher_accuracy']:.1f}%" in row
    assert "1 unreadable image(s) left out" in card and "Not measured" not in card

    # Licence: the local teacher has no card, so "other" (the teacher's terms) and a sentence saying so.
    assert (meta["license"], meta["license_name"]) == ("other", "teacher-license") and "base_model" not in meta
    assert "its model card states no licence" in card
    assert "datasets" not in meta  # local folders have no Hub dataset page


def test_example_labels_are_words_the_saved_tokenizer_knows(distilled):
    _, run = distilled
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    card = (run / "final" / "README.md").read_text()
    (widget,) = front_matter(card)["widget"]
    labels = [label.strip() for label in widget["candidate_labels"].split(",")]
    assert labels == ["circle", "noise", "square"]  # the evaluated classes come first
    assert widget["src"].startswith("https://huggingface.co/")
    assert f'candidate_labels={json.dumps(labels)}, hypothesis_template="a photo of a {{}}",' in card
    for label in labels:
        assert tokenizer.unk_token_id not in tokenizer(label)["input_ids"]
        assert tokenizer.unk_token_id not in tokenizer(f"a photo of a {label}")["input_ids"]
    # Without an evaluation: cat / dog / car are unknown to this word-level tokenizer, so its own words stand in.
    fallback = example_labels(tokenizer, prompts=["a photo of a red square", "a photo of a blue circle"])
    assert fallback == ["square", "circle"] and all(tokenizes_without_unknown(tokenizer, w) for w in fallback)
    assert not tokenizes_without_unknown(tokenizer, "cat")


def test_the_cards_snippet_runs_as_written_in_a_fresh_process(distilled, tmp_path):
    """The card's Python snippet, copied as a user would (the model id pointed at the downloaded folder, the image at
    one of theirs), runs offline in a fresh process without this package, and its example labels are scored as
    words (scores not all equal, as unknown tokens would make them)."""
    root, run = distilled
    card = (run / "final" / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    image = sorted((root / "labelled" / "circle").glob("*.png"))[0]
    snippet = snippet.replace('"your-username/run"', repr(str(run / "final"))).replace('"cat.jpg"', repr(str(image)))
    snippet = snippet.replace("classifier(image,", "results = classifier(image,")
    script = tmp_path / "snippet.py"
    script.write_text(
        snippet + "\nimport json\nprint(json.dumps({'stages': list(stages.shape), 'results': results, "
        "'refined': refined.exit_stage.tolist()}))\n"
    )
    env = subprocess_env(PYTHONPATH="")  # the saved folder's remote code, not this package
    done = subprocess.run(
        [PYTHON, "-I", str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # No interactive question (an AutoTokenizer call without trust_remote_code asked one) and no type warning.
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr
    assert "to instantiate a model of type" not in done.stderr
    output = json.loads(done.stdout)
    assert output["stages"] == [1, 2, 16]
    labels = json.loads(card.split("candidate_labels=")[1].split(", hypothesis_template")[0])
    assert sorted(r["label"] for r in output["results"]) == sorted(labels)
    assert sum(r["score"] for r in output["results"]) == pytest.approx(1.0, abs=1e-5)
    assert max(r["score"] for r in output["results"]) - min(r["score"] for r in output["results"]) > 1e-4
    assert all(r["stage"] in (0, 1) and r["gflops"] > 0 for r in output["results"])
    # The calibrated ("auto") call and `refine` on the processor's output ran as the card shows them.
    assert 'margin_threshold="auto"' in snippet and output["refined"] in ([0], [1])


def test_licence_given_inherited_or_the_teachers_terms(tmp_path):
    assert resolve_license("mit", "openai/clip-vit-base-patch16").license == "mit"
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# A teacher\n")
    inherited = resolve_license(None, str(teacher))
    assert (inherited.license, inherited.name) == ("cc-by-nc-4.0", None)
    assert "inherited from the teacher's model card" in inherited.origin
    (teacher / "README.md").write_text("---\nlicense: other\nlicense_name: clip-terms\nlicense_link: LICENSE\n---\n")
    assert dataclasses.astuple(resolve_license(None, str(teacher)))[:3] == ("other", "clip-terms", "LICENSE")
    # A Hub teacher whose card this (offline) machine cannot read: "other", linking the teacher's page.
    unknown = resolve_license(None, "openai/clip-vit-base-patch16")
    assert (unknown.license, unknown.link) == ("other", "https://huggingface.co/openai/clip-vit-base-patch16")


def test_the_main_jobs_accuracy_reaches_the_card(distilled, tmp_path):
    """What `end_to_end.run` does after measuring: `card_results` of the evaluation, then `rewrite_model_card`."""
    _, run = distilled
    copy = tmp_path / "student"
    shutil.copytree(run, copy)
    # A student cached before this fix: load-time keys in its tokenizer config, no config in its summary.json.
    tokenizer_config = json.loads((copy / "final" / "tokenizer_config.json").read_text())
    (copy / "final" / "tokenizer_config.json").write_text(
        json.dumps({**tokenizer_config, "is_local": True, "local_files_only": True})
    )
    summary = json.loads((copy / "summary.json").read_text())
    (copy / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    embeddings, rows = known_answer_embeddings()
    results = evaluate(embeddings, rows, tiny_student_config(levels=1), tiny_clip_config(), [0.0, 0.5, 1.01], 0.6)
    card_path = rewrite_model_card(copy / "final", card_results(results, len(rows), 0.5))
    card = card_path.read_text()
    meta = front_matter(card)
    (model,) = meta["model-index"]
    configs = [r["dataset"]["config"] for r in model["results"]]
    assert configs == list(AXES)
    texture = next(r for r in model["results"] if r["dataset"]["config"] == "texture")
    assert [m["value"] for m in texture["metrics"]] == [1.0, 0.0]  # all stages right, stage 0 wrong (known answers)
    assert texture["dataset"]["split"] == "test"
    assert (
        "| texture | waveclip_hf generated benchmark, texture axis (fine scale) (test) | 12 | 6 | 100.0% | 0.0% | "
        "100.0% |" in card
    )
    assert "the main job of waveclip_hf" in card and "Not measured" not in card
    # Everything else is the run's own: steps, date, and still no local path.
    summary = json.loads((copy / "summary.json").read_text())
    assert f"| Steps | {summary['step']} (global batch" in card
    assert str(tmp_path) not in card and str(run) not in card
    assert DistillationResult.from_json(summary).zero_shot[0].task == "labelled"
    saved = (copy / "final" / "tokenizer_config.json").read_text()
    assert "is_local" not in saved and "local_files_only" not in saved
    assert (
        AutoTokenizer.from_pretrained(copy / "final")("a red square")["input_ids"]
        == AutoTokenizer.from_pretrained(run / "final")("a red square")["input_ids"]
    )
    shutil.rmtree(copy / "checkpoints")  # and no checkpoint to read the config from: a clear error
    with pytest.raises(FileNotFoundError, match="holds no config .* and .* no checkpoint to read it from"):
        rewrite_model_card(copy / "final", card_results(results, len(rows), 0.5))


def test_hub_private_creates_a_private_repository(tmp_path, monkeypatch):
    """`--hub-private` with `--push-to-hub`: the repository is created private (the Hub client is recorded, not
    called), and the card names the repository in its snippet."""
    import huggingface_hub

    from waveclip_hf.cli.distill import main

    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], {"files": sorted(os.listdir(kwargs["folder_path"]))}))
            return "https://huggingface.co/me/waveclip-tiny/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    teacher, images = make_teacher(tmp_path / "teacher"), make_images(tmp_path / "images", 16)
    config = tiny_config(teacher, images, tmp_path / "run", max_steps=2, num_workers=0, eval_holdout=0)
    torch.set_num_threads(1)
    reset_accelerate_state()
    try:
        assert main([*cli_args(config), "--push-to-hub", "me/waveclip-tiny", "--hub-private", "--license", "mit"]) == 0
    finally:
        reset_accelerate_state()
    assert calls[0] == ("create_repo", "me/waveclip-tiny", {"repo_type": "model", "exist_ok": True, "private": True})
    assert calls[1][0] == "upload_folder" and "README.md" in calls[1][2]["files"]
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert front_matter(card)["license"] == "mit" and "as given when distilling (`--license`)" in card
    assert 'AutoModel.from_pretrained("me/waveclip-tiny", trust_remote_code=True)' in card
    assert "stands for the Hub repository" not in card
    with pytest.raises(ValueError, match="no repository was given: add --push-to-hub REPO_ID or drop --hub-private"):
        DistillationConfig(train_data="x", hub_private=True)


def test_recipe_vit_b16_gives_the_documented_settings_and_flags_override_it():
    from waveclip_hf.cli.distill import config_from_args, parse_args

    _, args = parse_args(["--recipe", "vit-b16", "--train-data", "/data/images", "--output-dir", "runs/b16"])
    config = config_from_args(args)
    documented = dict(
        teacher="openai/clip-vit-base-patch16",
        levels=1,
        cell_size=32,
        batch_size=128,
        max_steps=20_000,
        learning_rate=1e-4,
        mixed_precision="bf16",
        num_workers=8,
        checkpoint_every=1000,
        eval_every=1000,
    )
    assert {k: getattr(config, k) for k in documented} == documented == RECIPES["vit-b16"]
    assert config == DistillationConfig.from_recipe("vit-b16", train_data="/data/images", output_dir="runs/b16")
    # Explicit flags win, wherever they stand; everything else keeps the recipe's value.
    _, args = parse_args(
        [
            "--batch-size",
            "64",
            "--recipe",
            "vit-b16",
            "--train-data",
            "x",
            "--output-dir",
            "y",
            "--mixed-precision",
            "no",
        ]
    )
    config = config_from_args(args)
    assert (config.batch_size, config.mixed_precision, config.max_steps, config.learning_rate) == (
        64,
        "no",
        20_000,
        1e-4,
    )
    # Without a recipe, the library defaults.
    _, args = parse_args(["--train-data", "x", "--output-dir", "y"])
    assert config_from_args(args).batch_size == DistillationConfig().batch_size == 64
    with pytest.raises(ValueError, match="Unknown recipe 'vit-l14'; the recipes are \\['vit-b16'\\]"):
        DistillationConfig.from_recipe("vit-l14")


def test_recipe_help_shows_the_recipe_values(capsys):
    from waveclip_hf.cli.distill import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--recipe", "vit-b16", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE per device and micro-batch (default: 128)" in help_text
    assert "--eval-labelled-data FOLDER" in help_text and "--hub-private" in help_text and "--streaming" in help_text


def test_labelled_folder_errors_name_the_fix(tmp_path):
    from waveclip_hf.evaluation.zero_shot import labelled_image_folder

    with pytest.raises(ValueError, match="is not a folder. Pass a folder with one subfolder of images per class"):
        labelled_image_folder(tmp_path / "missing")
    (tmp_path / "only" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="has 1 class subfolder\\(s\\); zero-shot accuracy needs at least two"):
        labelled_image_folder(tmp_path / "only")
    (tmp_path / "only" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "cat" / "a.png")
    with pytest.raises(ValueError, match="Class folder 'dog' of 'only' holds no image"):
        labelled_image_folder(tmp_path / "only")
    (tmp_path / "only" / "dog" / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "dog" / "nested" / "b.jpg")  # found recursively
    classes, items = labelled_image_folder(tmp_path / "only")
    assert classes == ["cat", "dog"] and [(p.name, c) for p, c in items] == [("a.png", 0), ("b.jpg", 1)]
    with pytest.raises(ValueError, match="--eval-prompt-template: `hypothesis_template` 'a photo' has no"):
        DistillationConfig(train_data="x", eval_labelled_data=str(tmp_path / "only"), eval_prompt_template="a photo")


REPO = Path(__file__).resolve().parents[1]


def documented_distill_commands(markdown: str) -> list[list[str]]:
    """The flags of every complete `waveclip_hf.cli.distill` command in the markdown's code blocks (continuation
    lines joined; commands abbreviated with `...` left out)."""
    import shlex

    commands = []
    for block in markdown.split("```")[1::2]:
        if not block.startswith("bash"):
            continue
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "waveclip_hf.cli.distill" in words and "..." not in words:
                commands.append(words[words.index("waveclip_hf.cli.distill") + 1 :])
    return commands


def test_the_readme_gpu_install_and_recipe_commands_work_as_written():
    """README's *Distilling on a GPU machine*: a CUDA torch goes in before the project, which keeps it (torch is a
    lower bound only, and the setup script installs torch only where there is none); the distillation command it
    shows parses into the ViT-B/16 recipe with the labelled evaluation and a private upload."""
    import re
    import tomllib

    from waveclip_hf.cli.distill import config_from_args, parse_args

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Distilling on a GPU machine")[1].split("\n## ")[0]
    install = section.split("```bash")[1].split("```")[0].splitlines()
    cuda_torch = next(i for i, line in enumerate(install) if "download.pytorch.org/whl/cu" in line)
    project = next(i for i, line in enumerate(install) if 'pip install -e ".[dev]"' in line)
    assert cuda_torch < project and "torch.cuda.is_available()" in install[cuda_torch + 1]
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_requirement,) = [d for d in dependencies if re.match(r"torch\b", d)]
    assert re.fullmatch(r"torch>=[\d.]+", torch_requirement)  # any CUDA build already installed satisfies it
    assert "if ! \"$WAVECLIP_VENV/bin/python\" -c 'import torch'" in (REPO / "scripts" / "setup_env.sh").read_text()

    (flags,) = documented_distill_commands(section)
    config = config_from_args(parse_args(flags)[1])
    assert {k: getattr(config, k) for k in RECIPES["vit-b16"]} == RECIPES["vit-b16"]
    assert (config.eval_labelled_data, config.eval_prompt_template) == ("/data/val-by-class", "a photo of a {}.")
    assert (config.push_to_hub, config.hub_private) == ("your-org/waveclip-b16", True)
    streamed = config_from_args(
        parse_args([*flags, "--train-data", "imagenet-1k", "--data-split", "train", "--streaming"])[1]
    )
    assert (streamed.streaming, streamed.max_steps, streamed.train_data) == (True, 20_000, "imagenet-1k")


def test_every_documented_distill_command_parses():
    """Each complete command of README and docs/distillation.md is accepted by the CLI as written."""
    from waveclip_hf.cli.distill import config_from_args, parse_args

    commands = [
        flags
        for doc in ("README.md", "docs/distillation.md")
        for flags in documented_distill_commands((REPO / doc).read_text())
    ]
    assert len(commands) >= 5
    for flags in commands:
        config = config_from_args(parse_args(flags)[1])
        assert config.train_data and config.output_dir, flags
