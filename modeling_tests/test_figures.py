"""The docs' architecture picture: it is drawn, and every folder it names exists."""

import re
from pathlib import Path

from PIL import Image

from waveclip_hf.figures import architecture


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "waveclip_hf"


def test_architecture_picture_is_written(tmp_path):
    path = architecture.plot_architecture(tmp_path / "figures" / "architecture.png")
    with Image.open(path) as image:
        assert image.size == (1562, 836)  # 14.2 x 7.6 in at 110 dpi
    assert path.stat().st_size > 50_000


def test_architecture_picture_names_real_folders_and_modules():
    for key, label in architecture._FOLDERS.items():
        for path in re.findall(r"[a-z_]+/[a-z_/]*", label):
            folder, _, module = path.rstrip("/").rpartition("/")
            candidates = [
                PACKAGE / path,
                PACKAGE / folder / f"{module}.py",
                PACKAGE / folder / f"{module}_waveclip.py",
            ]
            assert any(candidate.exists() for candidate in candidates), (key, path)
    assert {key for key, *_ in architecture._BOXES} >= set(architecture._FOLDERS)
