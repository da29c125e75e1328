"""What a user copies from docs/ must work on their machine: no page or report names a folder of the machine that
wrote it."""

import re
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted(
    [
        REPO / "README.md",
        *(path for path in (REPO / "hub_card").rglob("*") if path.suffix in (".md", ".template", ".py", ".txt")),
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "docs").rglob("*.json"),
    ]
)
# Folders of a development or CI machine (a user's own data paths in examples, such as /data/images, are fine).
LOCAL_PATH = re.compile(
    r"(?<![\w.<>-])(/(?:work|tmp|home|root|Users|private|var/folders|mnt)/[^\s\"'`)|]*|[A-Z]:\\\\)"
)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_no_document_names_a_local_folder(path):
    text = path.read_text(errors="replace")
    found = sorted(set(LOCAL_PATH.findall(text)) | ({str(REPO)} if str(REPO) in text else set()))
    assert found == [], f"{path.relative_to(REPO)} names local folders: {found[:5]}"


def test_the_check_finds_a_local_folder():
    assert LOCAL_PATH.findall('"student": "/work/main/.cache/end_to_end/student-1/final"') == [
        "/work/main/.cache/end_to_end/student-1/final"
    ]
    assert LOCAL_PATH.findall("--cache-dir /tmp/e2e --no-progress") == ["/tmp/e2e"]
    assert LOCAL_PATH.findall("--train-data /data/images and <main job cache>/student-1 and runs/vitb") == []


def test_a_recorded_command_names_no_local_folder(tmp_path, monkeypatch):
    from waveclip_hf.experiments.report import recorded_command

    monkeypatch.chdir(tmp_path)
    argv = ["--cache-dir", "/work/cache/e2e", f"--docs-dir={tmp_path}/docs", "--override", '{"seed": 1}', "rel/dir"]
    line = recorded_command("python -m waveclip_hf.experiments.end_to_end", argv)
    assert line == (
        "python -m waveclip_hf.experiments.end_to_end --cache-dir '<folder>' --docs-dir=docs "
        "--override '{\"seed\": 1}' rel/dir"
    )
    assert LOCAL_PATH.findall(line) == []
