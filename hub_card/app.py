"""WaveCLIP demo: what each stage sees, what it answers, and what the answer cost.

    python hub_card/app.py --model runs/waveclip-offline          # locally (pip install waveclip-hf[demo])
    MODEL_ID=your-org/waveclip-b16 python app.py                  # as a Hugging Face Space (requirements.txt)

Upload an image, type labels, move the threshold. The page shows the image rebuilt from the wavelet bands each stage
has read (the approximation alone, then with each level's details), each stage's top answers, which stage answered
(the margin gate: top-1 minus top-2 probability reaching the threshold), and the GFLOPs it spent against the full
model and against a plain CLIP ViT of the same width and depth that reads the same pixels in patches of the finest
band's size.

Only gradio, torch, transformers and what the checkpoint's own code imports (ptwt, PyWavelets, Pillow, numpy): the
model, its processor, its pipeline and its FLOPs count come from the checkpoint through `trust_remote_code`.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPVisionConfig, pipeline


EXAMPLES = Path(__file__).resolve().parent / "examples"
# Example label sets of the offline benchmark's model (its card lists the words it knows).
EXAMPLE_QUESTIONS = [
    ("red, orange, yellow, green, cyan, blue, purple, pink", "a photo of a {} shape"),
    ("no pattern, horizontal stripes, vertical stripes, checkers, dots, a grid", "a photo of a shape with {}"),
    ("circle, square, triangle, star, ring, cross", "a photo of a {}"),
    ("0, 1, 2, 4, 5, 7", "a photo of a shape with the glyph {}"),
]


class StageDemo:
    """The model of `model_path` and everything the page shows, computed without gradio (tests call it directly)."""

    def __init__(self, model_path: str):
        self.model = AutoModel.from_pretrained(model_path, trust_remote_code=True).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.classifier = pipeline(
            "zero-shot-image-classification",
            model=self.model,
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            image_processor=self.image_processor,
            trust_remote_code=True,  # the pipeline class ships with the checkpoint; without it, a prompt on stdin
        )
        vision = self.model.config.vision_config
        # The FLOPs count ships with the checkpoint, beside the model's own file.
        flops = importlib.import_module(type(self.model).__module__.rsplit(".", 1)[0] + ".flops")
        self.stage_gflops = self.model.answer_gflops().tolist()  # cumulative, per stage answered
        plain_clip = CLIPVisionConfig(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_hidden_layers,
            num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size,
            patch_size=vision.cell_size // 2**vision.levels,
        )
        self.clip_gflops = flops.gflops(flops.clip_vit_flops(plain_clip, self.model.config.projection_dim))

    @property
    def num_stages(self) -> int:
        return len(self.stage_gflops)

    def stage_views(self, image) -> list[np.ndarray]:
        """Per stage, the (S, S, 3) uint8 image rebuilt from the bands read up to that stage (the others zeroed)."""
        pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        bands = self.image_processor.unpack(pixel_values)  # [A_L, (H, V, D)_L, ..., (H, V, D)_1]
        groups = self.model.config.vision_config.stage_band_groups
        views = []
        for stage in range(self.num_stages):
            read = set(groups[: stage + 1])
            kept = [bands[0] if 0 in read else torch.zeros_like(bands[0])]
            kept += [
                tuple(band if group in read else torch.zeros_like(band) for band in details)
                for group, details in enumerate(bands[1:], start=1)
            ]
            packed = _pack(kept)
            rgb = self.image_processor.inverse(packed)[0].clamp(0, 1)
            views.append((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        return views

    def answer(self, image, labels: str, template: str, threshold: float) -> dict:
        """The pipeline's answer with every stage's scores, and the costs.

        Returns:
            {"labels", "stage" (the one that answered), "answer" (ranked [{"label", "score"}]), "stage_scores"
            ({label: score} per stage run), "gflops", "full_gflops", "clip_gflops"}.
        """
        candidate_labels = [label.strip() for label in labels.split(",") if label.strip()]
        if len(candidate_labels) < 2:
            raise gr.Error("Type at least two labels, separated by commas.")
        if image is None:
            raise gr.Error("Upload an image first.")
        ranked = self.classifier(
            image,
            candidate_labels=candidate_labels,
            hypothesis_template=template or "This is a photo of {}.",
            margin_threshold=float(threshold),
            return_all_stages=True,
        )
        stage = ranked[0]["stage"]
        return {
            "labels": candidate_labels,
            "stage": stage,
            "answer": [{"label": entry["label"], "score": entry["score"]} for entry in ranked],
            "stage_scores": [
                {entry["label"]: entry["stage_scores"][index] for entry in ranked} for index in range(stage + 1)
            ],
            "gflops": ranked[0]["gflops"],
            "full_gflops": self.stage_gflops[-1],
            "clip_gflops": self.clip_gflops,
        }

    def summary(self, result: dict) -> str:
        """One paragraph: who answered, and the cost against the full model and plain CLIP."""
        best = result["answer"][0]
        stage, gflops = result["stage"], result["gflops"]
        skipped = self.num_stages - 1 - stage
        return (
            f"**{best['label']}** ({100 * best['score']:.1f}%), answered by **stage {stage}** of {self.num_stages - 1}"
            + (f"; {skipped} later stage(s) never ran." if skipped else ".")
            + f"\n\nImage encoder: **{gflops:.3g} GFLOPs**, {gflops / result['full_gflops']:.2f}x the full model "
            f"({result['full_gflops']:.3g}) and {gflops / result['clip_gflops']:.2f}x a plain CLIP ViT of the same "
            f"width reading the same pixels ({result['clip_gflops']:.3g}). 1 multiply-add = 2 FLOPs."
        )


def _pack(coefficients: list) -> torch.Tensor:
    """`[A, (H, V, D), ...]` coarsest first -> (B, 3, S, S), the processor's Mallat layout."""
    packed = coefficients[0]
    for horizontal, vertical, diagonal in coefficients[1:]:
        packed = torch.cat([torch.cat([packed, vertical], -1), torch.cat([horizontal, diagonal], -1)], -2)
    return packed


def build_demo(model_path: str) -> gr.Blocks:
    demo_model = StageDemo(model_path)
    stages = demo_model.num_stages
    captions = ["stage 0: the approximation band alone"] + [
        f"stage {s}: + the details of level {demo_model.model.config.vision_config.levels - s + 1}"
        for s in range(1, stages)
    ]

    def classify(image, labels, template, threshold):
        result = demo_model.answer(image, labels, template, threshold)
        views = demo_model.stage_views(image)
        bars = [
            result["stage_scores"][s] if s < len(result["stage_scores"]) else {"(not run: the gate stopped)": 0.0}
            for s in range(stages)
        ]
        gallery = [(view, caption) for view, caption in zip(views, captions)]
        return [demo_model.summary(result), gallery, *bars, result]

    examples = sorted(EXAMPLES.glob("*.png"))
    with gr.Blocks(title="WaveCLIP: coarse to fine") as demo:
        gr.Markdown(
            "# WaveCLIP: answer from the coarse image, read detail only when needed\n"
            "Stage 0 reads the wavelet approximation (a quarter-size image per level); each later stage adds the "
            "detail bands of one level, reusing everything computed before (a KV cache). The gate stops as soon as "
            "the top answer leads the second by the threshold."
        )
        with gr.Row():
            with gr.Column():
                # The first example is answered when the page opens, so the idea shows before anyone clicks.
                image = gr.Image(value=str(examples[0]) if examples else None, type="pil", label="image")
                labels = gr.Textbox(label="labels, comma-separated", value=EXAMPLE_QUESTIONS[0][0])
                template = gr.Textbox(label="template", value=EXAMPLE_QUESTIONS[0][1])
                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="threshold (margin; 1 = every stage)")
                run = gr.Button("Classify", variant="primary")
            with gr.Column():
                summary = gr.Markdown()
                gallery = gr.Gallery(label="what each stage sees", columns=stages, height=330, object_fit="contain")
                bars = [gr.Label(num_top_classes=5, label=f"stage {s}: top answers") for s in range(stages)]
                raw = gr.JSON(visible=False)
        outputs = [summary, gallery, *bars, raw]
        run.click(classify, [image, labels, template, threshold], outputs, api_name="classify")
        if examples:
            demo.load(classify, [image, labels, template, threshold], outputs, api_name=False)
            gr.Examples(
                [[str(path), *EXAMPLE_QUESTIONS[i % len(EXAMPLE_QUESTIONS)], 0.3] for i, path in enumerate(examples)],
                [image, labels, template, threshold],
            )
    return demo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_model = os.environ.get("MODEL_ID", "runs/waveclip-offline")
    parser.add_argument("--model", default=default_model, help="a saved WaveCLIP folder or Hub id")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    args = parser.parse_args(argv)
    build_demo(args.model).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
