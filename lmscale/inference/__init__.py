"""Inference and evaluation on exported models: no DeepSpeed, no Ray."""
