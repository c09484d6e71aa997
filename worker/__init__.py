"""Inference worker."""
