"""Shared input checks, and the rule that picks the Triton kernel or the reference implementation."""
import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through the Triton interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """CUDA tensors run the compiled kernel; CPU tensors run it only under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Every argument is a floating tensor (fp32/fp16/bf16) and all share one dtype and device."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def check_no_grad(op: str, *tensors: torch.Tensor) -> None:
    """The ops are inference-only: refuse inputs that would need a backward pass."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is inference-only (no autograd); call it under torch.no_grad() / torch.inference_mode() "
            "or pass tensors that do not require grad"
        )


def check_msw_args(op, q, k, v, size, shift, scale):
    """Validate msw_attention's arguments; returns ((H, W), (sh, sw), scale) as plain Python numbers."""
    check_tensors(op, q=q, k=k, v=v)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, N, heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{op}: q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, N, heads, head_dim = q.shape
    if min(B, N, heads, head_dim) == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(q.shape)}")
    H, W = _pair(op, "size", size)
    sh, sw = _pair(op, "shift", shift)
    if H < 1 or W < 1 or H * W != N:
        raise ValueError(f"{op}: size {(H, W)} does not match N={N} tokens (need H * W == N, H, W >= 1)")
    if not (0 <= sh < H and 0 <= sw < W):
        raise ValueError(f"{op}: shift {(sh, sw)} out of range for size {(H, W)} (need 0 <= sh < H, 0 <= sw < W)")
    if scale is None:
        scale = head_dim**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    return (H, W), (sh, sw), float(scale)


def _pair(op, name, value):
    """Two Python ints from a tuple/list/Size of two ints (torch.SymInt allowed for compile)."""
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a pair of ints, got {value!r}")
    if not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) for x in value):
        raise TypeError(f"{op}: {name} must be a pair of ints, got {value!r}")
    return int(value[0]), int(value[1])
