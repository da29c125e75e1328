"""The package's layout as it is in the code: which subpackage imports which, read from the source, and drawn.

`package_imports()` reads every module of `waveclip_hf` with `ast` (imports inside functions too) and returns the
imports between subpackages, with the number of import statements behind each arrow. `LAYERS` is the intended
order, bottom first: a package may import only the packages below it (`modeling_tests/test_package_layers.py`
checks it against the code). `plot_package_graph` draws the layers bottom-up with the arrows that the code has;
`python scripts/make_figures.py` renders it into docs/figures/package_imports.png for docs/architecture.md.
"""

import ast
from collections import Counter
from pathlib import Path


PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# Bottom first. `models` is the shipped folder (models/waveclip/): it imports none of the others.
LAYERS = (
    ("models",),
    ("data", "conversion"),
    ("hub", "evaluation"),
    ("training", "figures", "export"),
    ("benchmarking", "experiments"),
    ("cli",),
)
LAYER_OF = {package: index for index, layer in enumerate(LAYERS) for package in layer}
ROLES = {
    "models": (
        "waveclip/: the files a checkpoint ships\n(configuration, modeling, refinement, gate,\n"
        "image processor, pipeline)"
    ),
    "data": "generated benchmark,\nimage folders, tokenizer",
    "conversion": "CLIP teacher ->\nWaveCLIP student",
    "hub": "model card, loading\nchecks, Hub round trip",
    "evaluation": "zero-shot accuracy,\ngate sweeps, calibration",
    "training": "distillation and\nteacher trainers",
    "figures": "every picture\nin docs/",
    "export": "ONNX export and\nthe torch-free runner",
    "benchmarking": "wall-clock\nbenchmarks",
    "experiments": "the main job\nand its ablations",
    "cli": "command lines",
}


def _subpackage(module_path: Path) -> str | None:
    """The top-level subpackage a module belongs to (`None` for the package's own `__init__`)."""
    parts = module_path.relative_to(PACKAGE_ROOT).parts
    return parts[0] if len(parts) > 1 else None


def _imported_subpackages(module_path: Path) -> list[str]:
    """The subpackages of `waveclip_hf` one module imports (relative or absolute imports, at any depth)."""
    tree = ast.parse(module_path.read_text())
    depth = len(module_path.relative_to(PACKAGE_ROOT).parts) - 1  # folders between the package root and the file
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.module is None and node.level == 0:
            continue
        if node.level:  # relative: climb `level` folders, then follow `module`
            base = list(module_path.relative_to(PACKAGE_ROOT).parts[:-1])
            if node.level - 1 > depth:
                continue
            target = base[: len(base) - (node.level - 1)] + (node.module.split(".") if node.module else [])
        elif node.module.split(".")[0] == "waveclip_hf":
            target = node.module.split(".")[1:]
        else:
            continue
        if target:
            found.append(target[0])
    return found


def package_imports() -> Counter:
    """(importing subpackage, imported subpackage) -> number of import statements, across the package."""
    edges = Counter()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = _subpackage(path)
        if source is None:
            continue
        for target in _imported_subpackages(path):
            if target != source and target in LAYER_OF:
                edges[source, target] += 1
    return edges


def upward_imports(edges: Counter) -> list[tuple[str, str]]:
    """The imports that go against `LAYERS` (from a package to one in its own layer or above)."""
    return sorted(edge for edge in edges if LAYER_OF[edge[1]] >= LAYER_OF[edge[0]])


def plot_package_graph(path: str | Path, edges: Counter | None = None) -> Path:
    """Draw the subpackages by layer (bottom: the shipped folder) and the imports between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = package_imports() if edges is None else edges
    positions = {}
    for row, layer in enumerate(LAYERS):
        for column, package in enumerate(layer):
            positions[package] = ((column + 1) * 12.0 / (len(layer) + 1), 1.0 + 1.7 * row)
    figure, axes = plt.subplots(figsize=(10.5, 11))
    for (source, target), count in sorted(edges.items()):
        (x0, y0), (x1, y1) = positions[source], positions[target]
        bend = 0.25 if abs(x0 - x1) < 1e-6 and abs(y0 - y1) > 1.6 else 0.0
        axes.annotate(
            "",
            xy=(x1, y1 + 0.42),
            xytext=(x0, y0 - 0.42),
            arrowprops=dict(
                arrowstyle="-|>",
                color="#555555",
                lw=0.6 + 0.25 * min(count, 8),
                alpha=0.75,
                connectionstyle=f"arc3,rad={bend}",
                shrinkA=2,
                shrinkB=2,
            ),
        )
    for package, (x, y) in positions.items():
        colour = "#d8e8f8" if package == "models" else "#f6e6cc"
        axes.text(
            x,
            y,
            f"{package}/\n{ROLES[package]}",
            ha="center",
            va="center",
            fontsize=8.5,
            wrap=True,
            bbox=dict(boxstyle="round,pad=0.45", facecolor=colour, edgecolor="#777777"),
        )
    axes.set_xlim(0.5, 11.5)
    axes.set_ylim(0.2, 1.0 + 1.7 * (len(LAYERS) - 1) + 0.8)
    axes.axis("off")
    axes.set_title(
        "waveclip_hf: subpackages by layer (bottom: the shipped folder) and the imports between them\n"
        "(read from the source by figures/package_graph.py; arrow width: import statements)",
        fontsize=9,
    )
    path = Path(path)
    figure.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(figure)
    return path


__all__ = ["LAYERS", "LAYER_OF", "package_imports", "plot_package_graph", "upward_imports"]
