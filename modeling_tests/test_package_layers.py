"""The package's layers, read from the code: no subpackage imports one above it, and the shipped folder imports
none of the others (its files run inside users' environments)."""

from collections import Counter

from waveclip_hf.figures.package_graph import LAYER_OF, package_imports, upward_imports


def test_no_subpackage_imports_one_above_it():
    edges = package_imports()
    assert {source for source, _ in edges} | {target for _, target in edges} <= set(LAYER_OF)
    assert upward_imports(edges) == []
    assert not any(source == "models" for source, _ in edges)


def test_the_check_sees_an_upward_import():
    assert upward_imports(Counter({("evaluation", "training"): 2, ("training", "evaluation"): 1})) == [
        ("evaluation", "training")
    ]
    # Relative imports inside functions count too (the package's own modules have some).
    assert package_imports()["evaluation", "data"] >= 1
