"""Anchored Supervised Fine-Tuning (ASFT) and token-weighted SFT: losses, training, evaluation, workflow."""

__version__ = "0.1.0"
