"""WaveCLIP for Hugging Face transformers."""
