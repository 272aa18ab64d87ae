"""rewardbooth: reward-driven subject personalization for text-to-image diffusion."""

__version__ = "0.1.0"
