"""Figures for the docs (matplotlib lives here, never in the shipped model files)."""
