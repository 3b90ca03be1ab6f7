"""sdlearn: learn Stable Diffusion by building it."""
__version__ = "0.1.0"
