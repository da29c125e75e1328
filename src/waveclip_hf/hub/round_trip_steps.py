"""The steps of the Hub round trip, each run as its own fresh Python process by `round_trip.py`.

Run as a script (`python round_trip_steps.py STEP WORKDIR`), never imported: it stands for a user who has only
transformers and a WaveCLIP folder. An import blocker makes `import waveclip_hf` fail, so everything a step uses
comes from the folder's own remote code. Each step writes `<WORKDIR>/<STEP>.json` (and tensors as safetensors).

Steps:
    load_and_save  load folder `source` (model, processor, pipeline); keep reference outputs; save them again in
                   every way a user does: model + processor, the pipeline, a bfloat16 load, after fine-tuning, after
                   calibrating, and through `push_to_hub` (to a Hub stand-in folder); a pipeline save that fails
                   midway.
    reload         load every saved folder again and compute the same outputs.
    calibrated     a saved calibration used with `margin_threshold="auto"`, the labels in another order.
    threads        one pipeline and one model's `refine` shared by 8 threads, against the same calls in sequence.
    model_object   `pipeline(task, model=<loaded WaveCLIPModel object>)` and a gate argument given to it.
"""

import json
import logging
import os
import random
import sys
import threading
from pathlib import Path


class _BlockPackage:
    def find_spec(self, name, path=None, target=None):
        if name == "waveclip_hf" or name.startswith("waveclip_hf."):
            raise ImportError("waveclip_hf must not be imported here: only the folder's remote code")


sys.meta_path.insert(0, _BlockPackage())
del sys.path[0]  # this file's folder is inside the package: nothing may be imported from it

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, pipeline  # noqa: E402


TASK = "zero-shot-image-classification"
LABELS = ["red square", "green circle", "blue stripes", "white noise"]
SAVES = ("model_and_processor", "pipeline", "bfloat16", "fine_tuned", "calibrated", "pushed")


def images(count: int = 6, size: int = 72, seed: int = 0) -> list[np.ndarray]:
    """Fixed RGB images (uint8, size x size x 3): noise, so that every stage's answer matters."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def load(folder, **kwargs):
    """Model, processor and pipeline of a folder, with the folder's remote code."""
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    classifier = pipeline(TASK, model=str(folder), trust_remote_code=True, model_kwargs=kwargs)
    return model, processor, classifier


@torch.no_grad()
def outputs(model, processor, classifier) -> dict[str, torch.Tensor]:
    """Every stage's image embedding, the text embeddings and the pipeline's gated scores, as tensors."""
    inputs = processor(
        text=[f"a photo of a {label}." for label in LABELS], images=images(), return_tensors="pt", padding=True
    )
    result = {
        "stages": model.get_image_features(inputs["pixel_values"].to(model.dtype)).stage_pooler_outputs.float(),
        "text": model.get_text_features(
            inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output.float(),
    }
    answers = classifier(images(), candidate_labels=LABELS, margin_threshold=0.05)
    result["pipeline_scores"] = torch.tensor([[entry["score"] for entry in answer] for answer in answers])
    result["pipeline_stages"] = torch.tensor([answer[0]["stage"] for answer in answers])
    return result


def shipped_files(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".py"))


def fine_tune(model, processor, steps: int = 3) -> None:
    """A few optimizer steps on the vision tower: the CLIP contrastive loss on the fixed images and labels."""
    model.train()
    optimizer = torch.optim.AdamW([p for n, p in model.named_parameters() if n.startswith("vision_model.")], lr=1e-3)
    inputs = processor(
        text=[f"a photo of a {label}." for label in LABELS] * 2,
        images=images(8)[:8],
        return_tensors="pt",
        padding=True,
    )
    for _ in range(steps):
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


class HubStandIn:
    """What `push_to_hub` calls on the Hub (`create_repo`, `create_commit`), writing into a local folder instead:
    the uploaded files are exactly the ones transformers would send."""

    def __init__(self, root: Path):
        self.root = root

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(Path(operation.path_or_fileobj).read_bytes())


def push(objects, repo_id: str, hub_root: Path) -> None:
    """`push_to_hub` of each object, with the Hub replaced by `HubStandIn` (no network here)."""
    import huggingface_hub
    import transformers.utils.hub as hub

    stand_in = HubStandIn(hub_root)
    original_api, original_card = hub.hf_api, hub.create_and_tag_model_card
    hub.hf_api = lambda: stand_in
    hub.create_and_tag_model_card = lambda *args, **kwargs: huggingface_hub.ModelCard(
        "---\nlicense: apache-2.0\n---\n"
    )
    try:
        for obj in objects:
            obj.push_to_hub(repo_id)
    finally:
        hub.hf_api, hub.create_and_tag_model_card = original_api, original_card


def failing_pipeline_save(classifier, target: Path) -> dict:
    """A pipeline save whose tokenizer write fails: what is left at the target."""
    original = classifier.tokenizer.save_pretrained

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    classifier.tokenizer.save_pretrained = fail
    try:
        classifier.save_pretrained(target)
        error = None
    except OSError as caught:
        error = str(caught)
    finally:
        classifier.tokenizer.save_pretrained = original
    return {"error": error, "target_exists": target.exists(), "leftovers": sorted(os.listdir(target.parent))}


def step_load_and_save(work: Path) -> dict:
    model, processor, classifier = load(work / "source")
    save_file(outputs(model, processor, classifier), work / "reference.safetensors")
    saved = work / "saved"
    model.save_pretrained(saved / "model_and_processor")
    processor.save_pretrained(saved / "model_and_processor")
    classifier.save_pretrained(saved / "pipeline")
    bf16_model, bf16_processor, bf16_classifier = load(work / "source", dtype=torch.bfloat16)
    save_file(outputs(bf16_model, bf16_processor, bf16_classifier), work / "reference_bfloat16.safetensors")
    bf16_model.save_pretrained(saved / "bfloat16")
    bf16_processor.save_pretrained(saved / "bfloat16")
    fine_tune(classifier.model, processor)
    save_file(outputs(classifier.model, processor, classifier), work / "reference_fine_tuned.safetensors")
    classifier.save_pretrained(saved / "fine_tuned")
    calibration = classifier.calibrate(images(40, seed=1), candidate_labels=LABELS, target_agreement=0.9)
    classifier.save_pretrained(saved / "calibrated")
    push([classifier.model, processor], "user/waveclip-tiny", work / "hub")
    return {
        "calibration": {"threshold": calibration.threshold, "agreement": calibration.agreement},
        "failed_save": failing_pipeline_save(classifier, work / "failed" / "pipeline"),
        "loaded_from": type(model).__module__,
    }


def step_reload(work: Path) -> dict:
    report = {}
    for name in SAVES:
        folder = work / "hub" / "user" / "waveclip-tiny" if name == "pushed" else work / "saved" / name
        kwargs = {"dtype": torch.bfloat16} if name == "bfloat16" else {}
        model, processor, classifier = load(folder, **kwargs)
        save_file(outputs(model, processor, classifier), work / f"reloaded_{name}.safetensors")
        report[name] = {
            "files": shipped_files(folder),
            "dtype": str(model.dtype),
            "calibrations": len(model.config.gate_calibrations or []),
        }
    return report


def step_calibrated(work: Path) -> dict:
    classifier = pipeline(TASK, model=str(work / "saved" / "calibrated"), trust_remote_code=True)
    shuffled = LABELS[::-1]
    auto = classifier(images(), candidate_labels=shuffled, margin_threshold="auto")
    threshold = classifier.calibrated_threshold(shuffled, "This is a photo of {}.")
    explicit = classifier(images(), candidate_labels=shuffled, margin_threshold=threshold)
    try:
        classifier(images(1), candidate_labels=LABELS[:3], margin_threshold="auto")
        uncalibrated = None
    except ValueError as error:
        uncalibrated = str(error)
    return {
        "threshold": threshold,
        "auto_equals_explicit": auto == explicit,
        "labels_back_in_caller_order": sorted({e["label"] for e in auto[0]}) == sorted(shuffled),
        "uncalibrated_error": uncalibrated,
    }


def thread_calls(seed: int = 0) -> list[dict]:
    """24 calls: three label sets, thresholds None / 0.1 / 0.3, batches of 1 and 4 images."""
    rng = random.Random(seed)
    label_sets = [LABELS, LABELS[:2], ["white noise", "red square", "blue stripes"]]
    calls = []
    for index in range(24):
        count = rng.choice([1, 4])
        calls.append(
            {
                "labels": label_sets[index % 3],
                "threshold": [None, 0.1, 0.3][(index // 3) % 3],
                "images": count,
                "seed": 100 + index,
                "batch_size": rng.choice([1, count]),
            }
        )
    return calls


def run_in_threads(function, calls, threads: int = 8) -> tuple[list, list]:
    """Run `function(call)` for every call from `threads` threads at once; (results in call order, errors)."""
    results, errors = [None] * len(calls), []
    barrier = threading.Barrier(threads)

    def worker(offset):
        # torch's intra-op thread count is per thread: the same as the caller's, so that a reduction sums in the
        # same order as in the sequential calls.
        torch.set_num_threads(1)
        barrier.wait()
        for index in range(offset, len(calls), threads):
            try:
                results[index] = function(calls[index])
            except Exception as error:  # a crash is a result to report, not a reason to stop the other threads
                errors.append(f"{type(error).__name__}: {error}")

    workers = [threading.Thread(target=worker, args=(offset,)) for offset in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return results, errors


def step_threads(work: Path) -> dict:
    torch.set_num_threads(1)  # 8 Python threads on a 2-core machine: keep torch from oversubscribing
    folder = work / "saved" / "model_and_processor"
    classifier = pipeline(TASK, model=str(folder), trust_remote_code=True)
    model, processor = classifier.model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    embeds = {
        tuple(labels): classifier.label_embeddings(labels, "This is a photo of {}.")
        for labels in {tuple(call["labels"]) for call in thread_calls()}
    }

    def through_pipeline(call):
        return classifier(
            images(call["images"], seed=call["seed"]),
            candidate_labels=call["labels"],
            margin_threshold=call["threshold"],
            batch_size=call["batch_size"],
        )

    def through_refine(call):
        pixel_values = processor(images=images(call["images"], seed=call["seed"]), return_tensors="pt")["pixel_values"]
        out = model.refine(pixel_values, embeds[tuple(call["labels"])], call["threshold"])
        return [out.scores.tolist(), out.exit_stage.tolist()]

    report = {}
    for name, function in (("pipeline", through_pipeline), ("refine", through_refine)):
        calls = thread_calls()
        sequential = [function(call) for call in calls]
        concurrent, errors = run_in_threads(function, calls)
        report[name] = {
            "calls": len(calls),
            "threads": 8,
            "errors": errors,
            "differ": sum(a != b for a, b in zip(sequential, concurrent)),
        }
    return report


def step_model_object(work: Path) -> dict:
    folder = work / "saved" / "model_and_processor"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    # What transformers logs at error level while building the pipeline (a user reads it as "something is wrong").
    logged_errors = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = lambda record: logged_errors.append(record.getMessage())
    transformers_logger = transformers.utils.logging.get_logger("transformers")
    transformers_logger.addHandler(handler)
    classifier = pipeline(TASK, model=model, tokenizer=tokenizer, image_processor=image_processor)
    transformers_logger.removeHandler(handler)
    answer = classifier(images(1)[0], candidate_labels=LABELS, margin_threshold=0.0)
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip_config = CLIPConfig(
        text_config={**tower, "vocab_size": 99}, vision_config={**tower, "image_size": 32, "patch_size": 16}
    )
    clip = CLIPModel(clip_config)
    stock = pipeline(TASK, model=clip, tokenizer=tokenizer, image_processor=image_processor)
    return {
        "class": type(classifier).__name__,
        "stage": answer[0]["stage"],
        "keys": sorted(answer[0]),
        "clip_class": f"{type(stock).__module__}.{type(stock).__name__}",
        "logged_errors": logged_errors,
    }


STEPS = {
    "load_and_save": step_load_and_save,
    "reload": step_reload,
    "calibrated": step_calibrated,
    "threads": step_threads,
    "model_object": step_model_object,
}

if __name__ == "__main__":
    step, work = sys.argv[1], Path(sys.argv[2])
    report = STEPS[step](work)
    assert "waveclip_hf" not in sys.modules
    (work / f"{step}.json").write_text(json.dumps(report, indent=1))
