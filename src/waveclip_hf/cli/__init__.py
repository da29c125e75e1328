"""Command lines (`python -m waveclip_hf.cli.<name>`); each is a thin layer over a library function."""
