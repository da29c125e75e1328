"""Checkpoint conversion: build a WaveCLIP student from a transformers CLIP teacher."""

from .clip_to_waveclip import convert_clip_to_waveclip, student_config_from_clip


__all__ = ["convert_clip_to_waveclip", "student_config_from_clip"]
