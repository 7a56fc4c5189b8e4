"""Inference: the image-level pipeline and explanations."""
