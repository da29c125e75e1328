"""Answer zero-shot questions from an exported WaveCLIP (`onnx_export.py`) with onnxruntime and numpy: no torch.

    python -m waveclip_hf.export.onnx_runner runs/waveclip-onnx image.png --labels red,green,blue \\
        --template "a photo of a {} shape" --threshold 0.3

The runner does what the pipeline does with the margin gate: the image processor's steps in numpy (RGB in [0, 1],
shortest side resized with Pillow's bicubic in float, centre crop, full-range BT.601 YCbCr, normalisation, the
DWT with PyWavelets, packed in the Mallat layout), label prompts through `text.onnx`, then stage 0 on the batch,
the margin gate, and each later stage from the kept keys and values for the images still running. This module
imports no torch: it runs where only onnxruntime, numpy, Pillow, PyWavelets and tokenizers are installed.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pywt
from PIL import Image


CONFIG_NAME = "waveclip_onnx.json"
DEFAULT_TEMPLATE = "This is a photo of {}."


class OnnxWaveCLIP:
    """The exported graphs of a folder, and the margin-gated answer.

    Args:
        folder: written by `onnx_export.export_checkpoint`.
        threads: onnxruntime's intra-op threads (0: its default).
    """

    def __init__(self, folder: str | Path, threads: int = 0):
        import onnxruntime
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.config = json.loads((folder / CONFIG_NAME).read_text())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.stages = [
            onnxruntime.InferenceSession(str(folder / f"stage_{stage}.onnx"), options, providers=providers)
            for stage in range(self.config["num_stages"])
        ]
        self.text = onnxruntime.InferenceSession(str(folder / "text.onnx"), options, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.pad_id = self.tokenizer.token_to_id(self.tokenizer.padding["pad_token"]) if self.tokenizer.padding else 0

    # ---------------------------------------------------------------------------------------------- inputs

    def pixel_values(self, images) -> np.ndarray:
        """(B, 3, S, S) float32 packed coefficients, as `WaveCLIPImageProcessor` makes them."""
        return np.stack([self._one_image(image) for image in images]).astype(np.float32)

    def _one_image(self, image) -> np.ndarray:
        if isinstance(image, (str, Path)):
            image = Image.open(image)
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        size, (height, width) = self.config["image_size"], rgb.shape[:2]
        short, long = min(height, width), max(height, width)
        new_long = max(size, int(size * long / short))
        target = (new_long, size) if height > width else (size, new_long)  # (height, width)
        if target != (height, width):
            channels = [Image.fromarray(rgb[..., c]).resize(target[::-1], Image.BICUBIC) for c in range(3)]
            rgb = np.clip(np.stack([np.asarray(c) for c in channels], -1), 0, 1)
        top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
        rgb = rgb[top : top + size, left : left + size]
        return self._coefficients(rgb)

    def _coefficients(self, rgb: np.ndarray) -> np.ndarray:
        """(S, S, 3) RGB in [0, 1] -> (3, S, S) normalised YCbCr DWT coefficients in the Mallat layout."""
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        ycbcr = np.stack(
            [
                0.299 * r + 0.587 * g + 0.114 * b,
                -0.168736 * r - 0.331264 * g + 0.5 * b + 0.5,
                0.5 * r - 0.418688 * g - 0.081312 * b + 0.5,
            ]
        )
        mean, std = np.asarray(self.config["image_mean"])[:, None, None], np.asarray(self.config["image_std"])
        normalised = (ycbcr - mean) / std[:, None, None]
        coefficients = pywt.wavedec2(
            normalised, self.config["wavelet"], level=self.config["levels"], mode="zero", axes=(-2, -1)
        )
        packed = coefficients[0]
        for horizontal, vertical, diagonal in coefficients[1:]:  # `wavelet_layout.pack_coefficients`'s layout
            top, bottom = np.concatenate([packed, vertical], -1), np.concatenate([horizontal, diagonal], -1)
            packed = np.concatenate([top, bottom], -2)
        return packed

    def label_embeddings(self, labels, template: str = DEFAULT_TEMPLATE) -> np.ndarray:
        """(labels, projection_dim) normalised embeddings of the labels' prompts."""
        encodings = [self.tokenizer.encode(template.format(label)) for label in labels]
        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(labels), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(labels), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)], mask[row, : len(encoding.ids)] = encoding.ids, 1
        (embeds,) = self.text.run(None, {"input_ids": ids, "attention_mask": mask})
        return embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)

    # ---------------------------------------------------------------------------------------------- the answer

    def stage_outputs(self, stage: int, pixel_values: np.ndarray, keys=None, values=None):
        """(image embeddings, keys, values) after `stage`, from the keys and values after the stage before."""
        inputs = {"pixel_values": pixel_values}
        if stage:
            inputs.update(past_keys=keys, past_values=values)
        return self.stages[stage].run(None, inputs)

    def classify(self, images, labels, template: str = DEFAULT_TEMPLATE, margin_threshold=None) -> list[dict]:
        """Per image: labels ranked by score, the stage that answered and its GFLOPs (the pipeline's answer with
        the margin gate; `None`: every stage; "auto": the calibration exported with the model for these labels)."""
        if margin_threshold == "auto":
            margin_threshold = self.calibrated_threshold(labels, template)
        pixel_values, text = self.pixel_values(images), self.label_embeddings(labels, template)
        count, stages = len(pixel_values), self.config["num_stages"]
        probs, exit_stage = np.zeros((count, len(labels))), np.full(count, stages - 1)
        active, keys, values = np.arange(count), None, None
        for stage in range(stages):
            embeds, keys, values = self.stage_outputs(stage, pixel_values[active], keys, values)
            embeds = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
            logits = self.config["logit_scale"] * embeds @ text.T
            stage_probs = np.exp(logits - logits.max(-1, keepdims=True))
            stage_probs /= stage_probs.sum(-1, keepdims=True)
            top2 = np.sort(stage_probs, -1)[:, ::-1]
            margin = top2[:, 0] - top2[:, 1] if len(labels) > 1 else np.ones(len(active))
            if stage == stages - 1:
                stops = np.ones(len(active), bool)
            elif margin_threshold is None:
                stops = np.zeros(len(active), bool)
            else:  # compared in float32, as the model's gate compares
                stops = margin.astype(np.float32) >= np.float32(margin_threshold)
            probs[active[stops]], exit_stage[active[stops]] = stage_probs[stops], stage
            keys, values, active = keys[:, ~stops], values[:, ~stops], active[~stops]
            if not len(active):
                break
        return [self._answer(row, labels, int(stage)) for row, stage in zip(probs, exit_stage)]

    def _answer(self, probs: np.ndarray, labels, stage: int) -> list[dict]:
        order = np.argsort(-probs, kind="stable")
        gflops = float(self.config["stage_gflops"][stage])
        return [{"score": float(probs[i]), "label": labels[i], "stage": stage, "gflops": gflops} for i in order]

    def calibrated_threshold(self, labels, template: str):
        """The margin threshold the model's calibration chose for these labels (any order) and template."""
        wanted = (sorted(labels), [template])
        for record in self.config["gate_calibrations"]:
            templates = record["hypothesis_template"]
            templates = [templates] if isinstance(templates, str) else list(templates)
            if (record["labels"], templates) == wanted and record.get("signal", "margin") == "margin":
                return record["threshold"]
        raise ValueError(
            f"The exported model holds no margin calibration for these {len(labels)} labels and template "
            f"{template!r}: calibrate the model (`python -m waveclip_hf.cli.calibrate ... --save-to-model`) and "
            "export it again, or pass a number as the threshold."
        )


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the folder written by `python -m waveclip_hf.export.onnx_export`")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--labels", required=True, help="comma-separated candidate labels")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="prompt with {} for the label")
    parser.add_argument("--threshold", default=None, help="margin threshold, 'auto', or none for every stage")
    args = parser.parse_args(argv)
    threshold = args.threshold if args.threshold in (None, "auto") else float(args.threshold)
    runner = OnnxWaveCLIP(args.folder)
    started = time.perf_counter()
    answers = runner.classify(args.images, args.labels.split(","), args.template, threshold)
    seconds = time.perf_counter() - started
    for path, answer in zip(args.images, answers):
        print(json.dumps({"image": path, **answer[0]}))
    print(f"{len(answers)} image(s) in {seconds * 1000:.1f} ms ({seconds / max(len(answers), 1) * 1000:.1f} ms each)")
    return answers


if __name__ == "__main__":
    main()
