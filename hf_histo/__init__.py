"""hf-histo: fine-tune vision foundation models on small histopathology datasets with the Hugging Face stack."""

__version__ = "0.1.0"
