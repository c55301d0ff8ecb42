"""Shared input checks, the rule that picks the Triton kernel or the reference implementation, and the
description of a kernel build (``build_check``)."""
import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # as in kernel signatures
MAX_HEAD_DIM = 256  # the attention kernel keeps a whole head vector per token in one tile
_FLOAT32_MAX = torch.finfo(torch.float32).max  # the kernels take the scale as fp32


@triton.jit
def _defined_like_the_kernels():
    pass


def interpreter_enabled() -> bool:
    """True when hidiff's Triton kernels run through the Triton interpreter (CPU tensors included).

    Triton picks interpreter or compiler once, as it defines each kernel, from TRITON_INTERPRET (1, true, yes
    or on) at the time hidiff_kernels is imported; this asks a function defined beside the kernels what was
    picked, so a variable set or unset afterwards cannot make the launchers disagree with the kernels.
    """
    return isinstance(_defined_like_the_kernels, InterpretedFunction)


def autotune_enabled() -> bool:
    """False under HIDIFF_AUTOTUNE=0: CUDA launches then take each kernel's first (default) config instead of
    timing every candidate at each new shape: quicker first calls, slower kernels (used by the GPU parity run)."""
    return os.environ.get("HIDIFF_AUTOTUNE", "1") != "0"


def _major_minor(version: str) -> tuple[int, int]:
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


@functools.cache
def _interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    # triton < 3.7's interpreter turns one-element arrays into Python ints with int(), which numpy >= 2.4
    # refuses (triton-lang/triton#9171): every kernel launch would fail with an opaque InterpreterError.
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} cannot run with numpy {numpy_version} "
                "(triton-lang/triton#9171): install numpy<2.4 or triton>=3.7, or unset TRITON_INTERPRET")
    return None


def triton_runs_on(device: torch.device) -> bool:
    """CUDA tensors run the kernels; CPU tensors only when they were built for the interpreter (a RuntimeError
    if the installed triton and numpy cannot run it)."""
    if device.type == "cpu" and interpreter_enabled():
        problem = _interpreter_problem(triton.__version__, np.__version__)
        if problem:
            raise RuntimeError(problem)
        return True
    return device.type == "cuda"


def check_int32_span(op: str, **tensors: torch.Tensor) -> None:
    """The kernels widen only the batch offset to int64: one image (all dims but the first) must span fewer
    than 2**31 elements."""
    for name, t in tensors.items():
        if sum((n - 1) * s for n, s in zip(t.shape[1:], t.stride()[1:])) >= 2**31:
            raise ValueError(f"{op}: one image of {name} (shape {tuple(t.shape)}, strides {t.stride()}) spans "
                             "2**31 elements or more; the kernel indexes it with int32")


def launch_device(t: torch.Tensor):
    """The context to launch a kernel in: Triton launches on the current CUDA device, which must be t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


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


def autocast_inputs(*tensors):
    """The op's tensors as torch.autocast casts those of F.conv2d and scaled_dot_product_attention: floating
    ones (float64 aside) to the autocast dtype of their device type where autocast is on; anything else as given
    (None, or a bad argument for the checks to name)."""
    def cast(t):
        if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                and torch.amp.is_autocast_available(t.device.type) and torch.is_autocast_enabled(t.device.type)):
            return t.to(torch.get_autocast_dtype(t.device.type))
        return t

    return tuple(cast(t) for t in tensors)


def without_autocast(device: torch.device):
    """Autocast off for ``device``'s type: a registered op's reference fallback then returns its inputs' dtype, as
    the kernel and the op's fake do (the public wrappers cast for autocast before the op)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def check_no_grad(op: str, *tensors: torch.Tensor) -> None:
    """The ops are inference-only: refuse inputs that would need a backward pass."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op} is inference-only (no autograd); call it under torch.no_grad() / torch.inference_mode() "
            "or pass tensors that do not require grad"
        )


def check_msw_args(op, q, k, v, size, shift, scale):
    """Validate msw_attention's arguments; returns ((H, W), shift, scale): shift as (sh, sw) ints, or the
    integer tensor of shape [2] it was given (its values are read on the device, modulo (H, W))."""
    check_tensors(op, q=q, k=k, v=v)
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, N, heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"{op}: q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, N, heads, head_dim = q.shape
    if q.numel() == 0:  # not min() of the sizes: that would guard a symbolic batch size against the others
        raise ValueError(f"{op}: empty input of shape {tuple(q.shape)}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim {head_dim} is larger than the supported {MAX_HEAD_DIM}")
    H, W = _pair(op, "size", size)
    if H < 1 or W < 1 or H * W != N:
        raise ValueError(f"{op}: size {(H, W)} does not match N={N} tokens (need H * W == N, H, W >= 1)")
    if isinstance(shift, torch.Tensor):
        if shift.dtype not in (torch.int32, torch.int64) or shift.shape != (2,):
            raise TypeError(f"{op}: a shift tensor must be int32/int64 of shape [2], got {shift.dtype} "
                            f"of shape {tuple(shift.shape)}")
        if shift.device != q.device:
            raise ValueError(f"{op}: shift is on {shift.device} but q is on {q.device}")
    else:
        shift = sh, sw = _pair(op, "shift", shift)
        if not (0 <= sh < H and 0 <= sw < W):
            raise ValueError(f"{op}: shift {(sh, sw)} out of range for size {(H, W)} (need 0 <= sh < H, 0 <= sw < W)")
    if scale is None:
        scale = head_dim**-0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not abs(scale) <= _FLOAT32_MAX:
        raise TypeError(f"{op}: scale must be a finite float32 value or None, got {scale!r}")
    return (H, W), shift, float(scale)


def shift_ints(shift, size):
    """(sh, sw) as Python ints in range: a shift tensor is read back to the host (a sync) modulo the size."""
    if isinstance(shift, torch.Tensor):
        return tuple(s % n for s, n in zip(shift.tolist(), size))
    return shift


def _pair(op, name, value):
    """The two ints of a tuple/list/Size (a torch.SymInt stays symbolic: int() would specialize a compiled graph)."""
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) != 2:
        raise TypeError(f"{op}: {name} must be a pair of ints, got {value!r}")
    if not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) for x in value):
        raise TypeError(f"{op}: {name} must be a pair of ints, got {value!r}")
    return tuple(x if isinstance(x, torch.SymInt) else int(x) for x in value)


def check_conv_args(op, x, weight, bias, upsample=False, size=None, scale_factor=None):
    """Validate a RAU-Net 3x3 conv: x [B, Ci, H, W], weight [Co, Ci, 3, 3], bias [Co] or None.

    Returns ((Ho, Wo), factors): the output size (ceil(H/4) x ceil(W/4) for the RAD-conv, the
    nearest-upsampled size for the upsampling conv) and the scale factors as two floats when
    `scale_factor` was given (else None). The upsampling conv needs exactly one of size / scale_factor.
    """
    check_tensors(op, x=x, weight=weight, **({} if bias is None else {"bias": bias}))
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"{op}: weight must be [Co, Ci, 3, 3], got shape {tuple(weight.shape)}")
    if x.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"{op}: empty input: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    Co, Ci, H, W = weight.shape[0], x.shape[1], x.shape[2], x.shape[3]
    if weight.shape[1] != Ci:
        grouped = Ci % weight.shape[1] == 0
        raise ValueError(
            f"{op}: weight expects {weight.shape[1]} input channels but x has {Ci}"
            + (" (grouped convolutions are not supported)" if grouped else "")
        )
    if bias is not None and tuple(bias.shape) != (Co,):
        raise ValueError(f"{op}: bias must be [{Co}], got shape {tuple(bias.shape)}")
    if not upsample:
        return ((H + 3) // 4, (W + 3) // 4), None
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{op}: give exactly one of size and scale_factor")
    if size is not None:
        out = _pair(op, "size", size if isinstance(size, (tuple, list, torch.Size)) else (size, size))
        if min(out) < 1:
            raise ValueError(f"{op}: size must be positive, got {size!r}")
        return out, None
    factors = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
    if len(factors) != 2 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors):
        raise TypeError(f"{op}: scale_factor must be a float or a pair of floats, got {scale_factor!r}")
    if not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"{op}: scale_factor must be positive and finite, got {scale_factor!r}")
    out = (math.floor(H * factors[0]), math.floor(W * factors[1]))  # F.interpolate's output size
    if min(out) < 1:
        raise ValueError(f"{op}: scale_factor {scale_factor!r} gives an empty output from {H}x{W}")
    return out, (float(factors[0]), float(factors[1]))


@dataclass(frozen=True)
class KernelBuild:
    """One kernel variant a launcher can pick, for ``hidiff_kernels.build_check`` to compile."""

    name: str  # readable id, e.g. "msw_attention fp16 d=64 BLOCK_M=128 BLOCK_N=64 w4 s3"
    fn: object  # the @triton.jit function
    # argument name -> Triton type string ("*fp16", "i32", "fp32", ...), non-constexpr args. Pointers are
    # compiled as 16-byte aligned (as a launch with fresh torch tensors specializes them); "i32:16" marks
    # an int the launcher guarantees to be a multiple of 16.
    signature: dict
    constexprs: dict = field(default_factory=dict)  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    uses_tensor_cores: bool = True  # its tl.dot calls must become wgmma on sm_90 / mma on sm_80
