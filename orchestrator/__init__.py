"""Orchestrator for multi-stage diffusion serving on NVIDIA Triton."""

__version__ = "0.1.0"
