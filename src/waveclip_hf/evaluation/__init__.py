"""Evaluation: zero-shot accuracy from embeddings, and the gate's accuracy / GFLOPs calibration."""
