"""Model families. ``build_model`` turns the run's model section into a module."""

from lmscale.models.gpt import GPT, GPTConfig, flops_per_token

__all__ = ["GPT", "GPTConfig", "flops_per_token"]
