"""Data the project generates offline: the synthetic zero-shot benchmark and its word-level tokenizer."""

from .synthetic import AXES, LabelAxis, caption_for, generate_benchmark, label_ids, load_benchmark_split


__all__ = ["AXES", "LabelAxis", "caption_for", "generate_benchmark", "label_ids", "load_benchmark_split"]
