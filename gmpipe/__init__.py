"""gmpipe: a workflow-orchestrated training pipeline for latent generative models."""

__version__ = "0.1.0"
