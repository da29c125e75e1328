"""Benchmarks the project generates offline (see DESIGN.md §6)."""

from .synthetic import AXES, LabelAxis, caption_for, generate_benchmark, label_ids, load_benchmark_split

__all__ = ["AXES", "LabelAxis", "caption_for", "generate_benchmark", "label_ids", "load_benchmark_split"]
