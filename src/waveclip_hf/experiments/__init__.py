"""Experiments: the README's main job end to end, and the ablations built on its cached steps."""
