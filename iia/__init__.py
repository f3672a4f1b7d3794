"""iia: a deployment compiler for fast diffusion sampling (Improved Integration Approximation)."""

__version__ = "0.1.0"
