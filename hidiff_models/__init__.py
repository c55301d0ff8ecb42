"""Diffusers adapter for HiDiffusion (MSW-MSA + RAU-Net) on the hidiff fused kernels."""
from .adapter import apply_hidiffusion, remove_hidiffusion
from .steps import denoising_step

__all__ = ["apply_hidiffusion", "remove_hidiffusion", "denoising_step"]
