"""pro-grpo-lightning: Expand-and-Prune GRPO (Pro-GRPO) for diffusion and flow models, in Lightning."""

__version__ = "0.1.0"
