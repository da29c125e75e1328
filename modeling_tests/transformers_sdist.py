"""transformers' common test files, from the source distribution of the installed transformers release.

`tests/test_modeling_common.py` (`ModelTesterMixin`) and `tests/test_configuration_common.py` (`ConfigTester`) are
what every model in transformers passes. They ship in transformers' sdist on the package index, not in the wheel, so
`import_common_tests()` downloads the sdist of exactly the installed version with pip, unpacks those two files into
`.cache/transformers-tests/<version>/` at the top of the repository (gitignored; later runs reuse it) and imports them.

The two files import three helper modules that the sdist does not ship (they live elsewhere in transformers' git
tree). Small stand-ins, written here, take their place:
- `exporters/test_export.py::ExportTesterMixin`: transformers' export harness (it drives whole export backends). An
  empty mixin here; `test_transformers_common.py` has WaveCLIP's own `torch.export` tests (static and dynamic).
- `generation/test_utils.py::GenerationTesterMixin`: only mixed into testers of generative models, which WaveCLIP
  is not; the common file only checks that a tester is not one.
- `utils/test_configuration_utils.py::config_common_kwargs`: the `PreTrainedConfig` arguments that every config
  must accept and keep, each with a value other than its default (`ConfigTester.check_config_arguments_init`).
"""

import importlib
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers


REPO = Path(__file__).resolve().parent.parent
PACKAGE = "transformers_common_tests"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")
STAND_INS = {
    "exporters/test_export.py": (
        '"""Stand-in for transformers\' export harness, which the sdist does not ship (transformers_sdist.py)."""\n'
        "\n\nclass ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stand-in: the sdist does not ship it, and only generative models\' testers use it."""\n'
        "\n\nclass GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in: common `PreTrainedConfig` arguments, each set to a value other than its default."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


class SdistUnavailable(RuntimeError):
    """The sdist could not be downloaded (no reachable package index, or no sdist for this version)."""


def _download_sdist(version: str, destination: Path) -> Path:
    """`pip download` the sdist of transformers==version into `destination`; returns the archive."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        f"transformers=={version}",
        "--dest",
        str(destination),
    ]
    # pip reads the sdist's metadata after downloading it; with the setuptools already installed that takes seconds,
    # while an isolated build environment is installed first (about a minute).
    attempts = [[*command, "--no-build-isolation"], command]
    if importlib.util.find_spec("setuptools") is None:
        attempts = attempts[1:]
    errors = []
    for attempt in attempts:
        try:
            result = subprocess.run(attempt, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            errors.append("pip download timed out after 600 s")
            continue
        archives = sorted(destination.glob("transformers-*.tar.gz"))
        if result.returncode == 0 and archives:
            return archives[0]
        errors.append((result.stderr.strip().splitlines() or ["pip download failed"])[-1])
    raise SdistUnavailable(f"pip could not download the sdist of transformers=={version}: {errors[-1]}")


def _unpack(archive: Path, package: Path) -> None:
    """Write the common test files and the stand-ins as the package `package`."""
    package.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        for name in COMMON_FILES:
            member = next((m for m in tar.getmembers() if m.name.endswith(f"/tests/{name}")), None)
            if member is None:
                raise SdistUnavailable(f"{archive.name} has no tests/{name}")
            (package / name).write_bytes(tar.extractfile(member).read())
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {package, *((package / relative).parent for relative in STAND_INS)}:
        (folder / "__init__.py").touch()


def common_tests_root(version: str = transformers.__version__) -> Path:
    """The folder holding the package of common tests for `version`, fetched on first use."""
    root = REPO / ".cache" / "transformers-tests" / version
    if (root / PACKAGE / COMMON_FILES[0]).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as scratch:
        staging = Path(scratch) / "root"
        _unpack(_download_sdist(version, Path(scratch)), staging / PACKAGE)
        # Renamed into place whole, so an interrupted fetch never leaves a half-written cache behind.
        if not root.exists():
            staging.rename(root)
    return root


def import_common_tests() -> tuple[ModuleType, ModuleType]:
    """(test_modeling_common, test_configuration_common) of the installed transformers release."""
    root = str(common_tests_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    modeling = importlib.import_module(f"{PACKAGE}.test_modeling_common")
    configuration = importlib.import_module(f"{PACKAGE}.test_configuration_common")
    return modeling, configuration
