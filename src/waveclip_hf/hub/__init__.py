"""Hub: the model card of a distilled checkpoint."""
