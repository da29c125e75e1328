"""Speed benchmarks: WaveCLIP against a plain CLIP ViT, side by side in one process."""
