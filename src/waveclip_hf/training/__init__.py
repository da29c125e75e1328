"""Training: the distillation trainer that builds a WaveCLIP from a frozen CLIP teacher, and the small CLIP
teacher trained on the generated benchmark."""
