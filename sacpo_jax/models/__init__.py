"""LLaMA-family models and the Hugging Face checkpoint converter."""
