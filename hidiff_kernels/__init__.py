"""Fused Triton kernels for HiDiffusion (MSW-MSA window attention, RAU-Net convolutions).

Every op is inference-only, registered with torch.library, and has a plain PyTorch twin in
``hidiff_kernels.reference``. CUDA tensors run the Triton kernel; CPU tensors run it through the
Triton interpreter when TRITON_INTERPRET=1 was set before this package was imported, and the reference
otherwise.
"""
from . import reference
from ._common import interpreter_enabled, triton_runs_on
from .ops.msw_attention import msw_attention
from .ops.rau_conv import rau_downsample_conv, upsample_conv

__all__ = ["reference", "interpreter_enabled", "triton_runs_on", "msw_attention", "rau_downsample_conv", "upsample_conv"]
