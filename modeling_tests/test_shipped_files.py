"""A checkpoint runs with only its runtime packages: what the shipped files import, which files a saved folder
carries, and a saved folder run in a fresh process that cannot import this package or matplotlib."""

import ast
import importlib
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from test_hub_loading import LABELS, run_fresh_python, save_tiny_folder
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_imports, get_relative_imports

from waveclip_hf import WaveCLIPImageProcessor, WaveCLIPProcessor


REPO = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO / "src" / "waveclip_hf" / "models" / "waveclip"
SHIPPED = sorted(path.name for path in SHIPPED_DIR.glob("*.py") if path.name != "__init__.py")
# What a checkpoint may need besides the standard library: the runtime packages (PyWavelets is imported as pywt), and
# two that every transformers install brings (transformers' own configs import `strict` from huggingface_hub).
RUNTIME_PACKAGES = {"torch", "transformers", "numpy", "PIL", "ptwt", "pywt", "huggingface_hub", "safetensors"}
# The install line of the model card: pip names, the transformers range of pyproject.toml.
PIP_PACKAGES = ("torch", "transformers", "ptwt", "PyWavelets", "pillow")


def all_imports(path: Path) -> set[str]:
    """Top-level packages of every absolute import in the file, wherever it stands (try blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_files_import_only_runtime_packages(name):
    path = SHIPPED_DIR / name
    allowed = RUNTIME_PACKAGES | set(sys.stdlib_module_names)
    assert set(get_imports(path)) <= allowed  # what transformers checks before running remote code
    assert all_imports(path) <= allowed  # and what the file really imports
    assert set(get_relative_imports(path)) <= {Path(shipped).stem for shipped in SHIPPED}


def test_transformers_never_asks_to_pip_install_pywt():
    # transformers turns a missing import name into `pip install <name>`; `pywt` is not PyWavelets' pip name.
    assert "pywt" in all_imports(SHIPPED_DIR / "image_processing_waveclip.py")
    assert not any("pywt" in get_imports(SHIPPED_DIR / name) for name in SHIPPED)


def test_a_missing_pywavelets_is_named_by_its_pip_name(monkeypatch):
    module = "waveclip_hf.models.waveclip.image_processing_waveclip"
    monkeypatch.setitem(sys.modules, "pywt", None)  # makes `import pywt` fail
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=r"needs PyWavelets \(imported as `pywt`\): `pip install PyWavelets`"):
        importlib.import_module(module)


def test_a_saved_folder_carries_exactly_the_shipped_files(tmp_path):
    """transformers' `register_for_auto_class` ships the files: a model's save carries its modeling file and every
    relative import (the gated pipeline's among them); the processor's save adds the image processor's file."""
    model = tiny_model(levels=1)
    model.save_pretrained(tmp_path / "model")
    model_files = sorted(path.name for path in (tmp_path / "model").glob("*.py"))
    assert model_files == sorted(set(SHIPPED) - {"image_processing_waveclip.py", "image_decoding_waveclip.py"})
    model.vision_model.save_pretrained(tmp_path / "vision")
    assert sorted(path.name for path in (tmp_path / "vision").glob("*.py")) == model_files
    WaveCLIPProcessor(
        WaveCLIPImageProcessor(),
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))),
    ).save_pretrained(tmp_path / "model")
    assert sorted(path.name for path in (tmp_path / "model").glob("*.py")) == SHIPPED
    for name in SHIPPED:
        assert (tmp_path / "model" / name).read_bytes() == (SHIPPED_DIR / name).read_bytes()
    # The processor alone carries its own file and what that imports (transformers' `register_for_auto_class`).
    WaveCLIPImageProcessor().save_pretrained(tmp_path / "processor")
    assert sorted(path.name for path in (tmp_path / "processor").glob("*.py")) == [
        "image_decoding_waveclip.py",
        "image_processing_waveclip.py",
        "wavelet_layout.py",
    ]


def test_the_model_card_starts_its_how_to_use_with_the_install_line():
    requirement = next(
        dep
        for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if dep.startswith("transformers")
    )
    template = (REPO / "hub_card" / "README.md.template").read_text()
    how_to_use = template.split("## How to use", 1)[1].lstrip()
    quoted = {"transformers": f'"{requirement}"'}
    install = "pip install " + " ".join(quoted.get(name, name) for name in PIP_PACKAGES)
    assert how_to_use.startswith(f"```bash\n{install}\n```"), how_to_use[:200]
    assert re.fullmatch(r"transformers>=5\.\d+(\.\d+)?,<6", requirement)


# Packages a user of a checkpoint does not have: this package, and what only training, figures or evaluation use.
BLOCKED = ("waveclip_hf", "matplotlib", "datasets", "evaluate", "skimage")
BLOCK_IMPORTS = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} cannot be imported here: a checkpoint needs only its runtime packages")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.slow
def test_a_saved_folder_runs_in_a_process_with_only_the_runtime_packages(tmp_path):
    folder = tmp_path / "model"
    model = save_tiny_folder(folder, levels=2)
    pixel_values = WaveCLIPImageProcessor(image_size=64, levels=2)(
        images=[torch.rand(3, 80, 96), torch.rand(3, 64, 64)], return_tensors="pt"
    )["pixel_values"]
    save_file({"pixel_values": pixel_values}, tmp_path / "inputs.safetensors")
    with torch.no_grad():
        expected = model.get_image_features(pixel_values).stage_pooler_outputs
    run_fresh_python(
        BLOCK_IMPORTS
        + f"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, pipeline
folder = {str(folder)!r}
pixel_values = load_file({str(tmp_path / "inputs.safetensors")!r})["pixel_values"]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
stages, cache = [], None
with torch.no_grad():
    for stage in range(model.num_stages):
        out = model.get_image_features(pixel_values, num_stages=stage + 1, cache=cache, use_cache=True)
        stages.append(out.pooler_output)
        cache = out.cache
classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
images = [torch.rand(3, 80, 96), torch.rand(3, 64, 64)]
gated = classifier(images, candidate_labels={LABELS!r}, margin_threshold=0.0, batch_size=2)
full = classifier(images, candidate_labels={LABELS!r}, batch_size=2)
save_file({{"stages": torch.stack(stages, 1)}}, {str(tmp_path / "outputs.safetensors")!r})
json.dump({{"gated": gated, "full": full, "pipeline": type(classifier).__name__,
           "modules": sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})}},
          open({str(tmp_path / "result.json")!r}, "w"))
""",
        tmp_path,
    )
    torch.testing.assert_close(load_file(tmp_path / "outputs.safetensors")["stages"], expected, rtol=1e-5, atol=1e-5)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["pipeline"] == "WaveCLIPZeroShotImageClassificationPipeline" and result["modules"] == []
    assert [{entry["stage"] for entry in image} for image in result["gated"]] == [{0}, {0}]
    assert [{entry["stage"] for entry in image} for image in result["full"]] == [{2}, {2}]
