"""The demo page (hub_card/app.py), used as a person uses it: served on localhost, driven through gradio's client
(upload, labels, threshold) and, in a slow test, opened in headless Chromium for a screenshot.

Starting the server takes a few seconds; the screenshot test about half a minute and Debian's chromium package.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_hub_loading import LABELS, save_tiny_folder
from transformers import pipeline


REPO = Path(__file__).resolve().parents[1]
APP = REPO / "hub_card" / "app.py"


def load_script():
    """scripts/demo_screenshot.py as a module: it loads the app, finds a free port and takes the screenshot."""
    spec = importlib.util.spec_from_file_location("demo_screenshot", REPO / "scripts" / "demo_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny two-stage model's demo, served on localhost: (folder, url, app module)."""
    folder = tmp_path_factory.mktemp("demo") / "model"
    save_tiny_folder(folder, levels=1)
    script = load_script()
    app = script.load_app()
    demo = app.build_demo(str(folder))
    port = script.free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield folder, f"http://127.0.0.1:{port}/", app
    finally:
        demo.close()


def photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_the_served_page_answers_as_the_pipeline_does(served, tmp_path, threshold):
    from gradio_client import Client, handle_file

    folder, url, _ = served
    image = photo(tmp_path / "photo.png")
    labels = LABELS[:4]
    client = Client(url, verbose=False)
    summary, gallery, *rest = client.predict(
        handle_file(str(image)), ", ".join(labels), "This is a photo of {}.", threshold, api_name="/classify"
    )
    *bars, raw = rest
    expected = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)(
        Image.open(image), candidate_labels=labels, margin_threshold=threshold
    )
    assert [entry["label"] for entry in raw["answer"]] == [entry["label"] for entry in expected]
    scores = [entry["score"] for entry in expected]
    assert [entry["score"] for entry in raw["answer"]] == pytest.approx(scores, abs=1e-5)
    assert raw["stage"] == expected[0]["stage"] == (0 if threshold == 0.0 else 1)
    assert raw["gflops"] == pytest.approx(expected[0]["gflops"])
    assert f"answered by **stage {raw['stage']}** of 1" in summary and expected[0]["label"] in summary
    assert len(gallery) == 2 and len(bars) == 2  # one view and one bar chart per stage
    if threshold == 0.0:
        assert bars[1]["label"] == "(not run: the gate stopped)"
    else:
        assert {c["label"] for c in bars[1]["confidences"]} <= set(labels)


def test_each_stage_sees_the_bands_read_so_far(served):
    folder, _, app = served
    demo_model = app.StageDemo(str(folder))
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    coarse, full = demo_model.stage_views(image)
    # The last stage has read every band: the processor's own inverse gives the image back (to 8-bit rounding).
    pixel_values = demo_model.image_processor(images=image, return_tensors="pt")["pixel_values"]
    rebuilt = demo_model.image_processor.inverse(pixel_values)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert np.abs(full.astype(float) / 255 - rebuilt).max() <= 1 / 255
    # Stage 0 has read the approximation only: constant over each 2x2 block (Haar, one level), and blurrier.
    blocks = coarse.astype(float).reshape(32, 2, 32, 2, 3)
    assert np.abs(blocks - blocks[:, :1, :, :1]).max() <= 1.0
    assert np.abs(np.diff(coarse.astype(float), axis=1)).mean() < np.abs(np.diff(full.astype(float), axis=1)).mean()


def test_bad_questions_get_a_message_not_a_crash(served):
    import gradio as gr

    _, _, app = served
    demo_model = app.StageDemo(str(served[0]))
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    with pytest.raises(gr.Error, match="at least two labels"):
        demo_model.answer(image, "coffee cup", "", 0.3)
    with pytest.raises(gr.Error, match="Upload an image"):
        demo_model.answer(None, "coffee cup, teapot", "", 0.3)


def test_the_app_imports_only_the_demo_requirements():
    """A Space installs hub_card/requirements.txt only: the app must not import this package."""
    source = APP.read_text()
    assert "waveclip_hf" not in source.replace("waveclip-hf[demo]", "")
    requirements = (REPO / "hub_card" / "requirements.txt").read_text()
    assert "gradio" in requirements and "transformers>=5.20,<6" in requirements


@pytest.mark.slow
def test_the_page_in_headless_chromium(served, tmp_path):
    """Opens the page in Debian's Chromium (`apt install chromium`), as `scripts/demo_screenshot.py` does for docs/:
    the screenshot is taken once the page's text shows the first example's answer ("answered by stage ...")."""
    script = load_script()
    _, url, _ = served
    picture = np.asarray(Image.open(script.screenshot(url, tmp_path / "demo.png", 1280, 900)).convert("RGB"))
    assert picture.shape[:2] == (900, 1280)
    # Not blank: the form, the example image and the answer's bars are drawn.
    assert picture.std() > 10 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 500


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "slow or not slow", "-q"]))
