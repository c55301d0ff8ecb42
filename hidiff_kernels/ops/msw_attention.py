"""Fused MSW-MSA: attention inside the 2x2 windows of the shifted token map, in one Triton kernel.

A window of the map rolled by (-sh, -sw) is a rectangle of the original map that wraps at the edges
(rolled row p is original row (p + sh) mod H), so every program computes the original-layout
addresses of its window's tokens and runs flash attention (tiled, online softmax, fp32
accumulation) over them. Nothing is rolled, partitioned, padded or masked in memory.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._common import (
    TRITON_DTYPES, KernelBuild, autocast_inputs, autotune_enabled, check_int32_span, check_msw_args, check_no_grad,
    interpreter_enabled, launch_device, triton_runs_on, without_autocast,
)

_OP = "msw_attention"
_LOG2E = 1.4426950408889634

# Kernel tiles per (fp32 inputs?, head-dim class): [(BLOCK_M, BLOCK_N, num_warps, num_stages)].
# Half inputs: BLOCK_M a multiple of 64 (wgmma's rows per warpgroup on sm_90). fp32 inputs use
# exact fp32 dots (FMA, no tensor cores) whose operands live in registers: smaller tiles. Every
# entry compiles without register spills for sm_90 and sm_80 (python -m hidiff_kernels.build_check).
CONFIGS = {
    (False, 64): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
    (False, 128): [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    (False, 256): [(64, 64, 8, 2), (64, 32, 8, 2)],
    (True, 64): [(64, 16, 8, 2), (32, 32, 8, 2), (64, 16, 4, 2)],
    (True, 128): [(64, 16, 4, 2), (32, 16, 4, 2)],
    (True, 256): [(32, 16, 8, 1), (16, 16, 8, 2)],
}
# The interpreter runs one small config: autotuning it would only cost time.
INTERPRETER_CONFIG = (16, 16, 4, 1)


@triton.jit
def _window_tokens(t, nc, r0, c0, sh, sw, H, W):
    """Original row-major token index of window-order positions t (window origin (r0, c0) in the rolled map, nc columns)."""
    row = r0 + t // nc + sh
    col = c0 + t % nc + sw
    row = tl.where(row >= H, row - H, row)  # r0 + i + sh < 2H: one wrap at most
    col = tl.where(col >= W, col - W, col)
    return row * W + col


@triton.jit
def _head_vectors(ptr, batch, head, tok, offs_d, stride_b, stride_n, stride_h, stride_d, ALIGNED: tl.constexpr):
    """[len(tok), BLOCK_D] pointers to the head vectors of tokens tok (the launcher keeps tok * stride_n in int32)."""
    rows = ptr + batch * stride_b + head * stride_h + tok * stride_n
    if ALIGNED:  # the launcher checked that head vectors are contiguous and start 16-byte aligned: vector loads
        vectors = tl.multiple_of(rows, 16)[:, None] + offs_d[None, :]
    else:
        vectors = rows[:, None] + offs_d[None, :] * stride_d
    return vectors


# Sizes and shifts only enter index arithmetic: specializing on their divisibility by 16 would compile a new
# variant for each shift phase of a generation.
@triton.jit(do_not_specialize=["H", "W", "sh", "sw"])
def _msw_attention_kernel(
    Q, K, V, O,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    H, W, sh, sw, SHIFT, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,  # head vectors are contiguous and 16-byte aligned
    SHIFT_IN_MEMORY: tl.constexpr,  # read (sh, sw) from the int64 tensor SHIFT instead of the sh, sw arguments
    UPCAST: tl.constexpr,  # interpreter only: its bf16 arithmetic is wrong, so compute on fp32 tiles
):
    pid_m = tl.program_id(0)
    window = tl.program_id(1) % 4
    head = tl.program_id(1) // 4
    batch = tl.program_id(2).to(tl.int64)
    if SHIFT_IN_MEMORY:  # a device tensor: a captured CUDA graph replays with new values; any int, taken mod size
        sh = ((tl.load(SHIFT) % H + H) % H).to(tl.int32)
        sw = ((tl.load(SHIFT + 1) % W + W) % W).to(tl.int32)

    # Window (wr, wc) of the rolled map: rows [r0, r0 + nr), columns [c0, c0 + nc); the
    # second row/column range is shorter for odd sizes and empty for H or W == 1.
    wh = (H + 1) // 2
    ww = (W + 1) // 2
    r0 = (window // 2) * wh
    c0 = (window % 2) * ww
    nr = tl.where(window // 2 == 0, wh, H - wh)
    nc = tl.where(window % 2 == 0, ww, W - ww)
    L = nr * nc
    if pid_m * BLOCK_M >= L:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m < L)[:, None] & d_ok[None, :]
    q_tok = _window_tokens(offs_m, nc, r0, c0, sh, sw, H, W)
    q = tl.load(_head_vectors(Q, batch, head, q_tok, offs_d, stride_qb, stride_qn, stride_qh, stride_qd, ALIGNED),
                mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, L, BLOCK_N):
        n_ok = start_n + offs_n < L
        kv_tok = _window_tokens(start_n + offs_n, nc, r0, c0, sh, sw, H, W)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(_head_vectors(K, batch, head, kv_tok, offs_d, stride_kb, stride_kn, stride_kh, stride_kd, ALIGNED),
                    mask=kv_mask, other=0.0)
        v = tl.load(_head_vectors(V, batch, head, kv_tok, offs_d, stride_vb, stride_vn, stride_vh, stride_vd, ALIGNED),
                    mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # "ieee": fp32 inputs get exact fp32 products instead of TF32; half inputs use tensor cores either way.
        qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        # Every block holds at least one real key, so m_new is finite (or NaN from NaN inputs, which then spreads).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = _head_vectors(O, batch, head, q_tok, offs_d, stride_ob, stride_on, stride_oh, stride_od, ALIGNED)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _config_class(dtype, head_dim):
    return dtype == torch.float32, max(64, _block_d(head_dim))


@functools.cache
def _tuned_kernel(config_class):
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in CONFIGS[config_class]
    ]
    # H, W set the window sizes; the autotuner adds the tensors' dtypes to the key by itself.
    return triton.autotune(configs, key=["H", "W", "HEAD_DIM"])(_msw_attention_kernel)


def _aligned(*tensors):
    """Whether every head vector is contiguous and starts at a 16-byte boundary (then the kernel loads 16-byte vectors)."""
    return all(
        t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:3])
        for t in tensors
    )


def _empty_output(q):
    """The output buffer (a hook for tests that poison it to prove every element is written)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _launch(q, k, v, H, W, shift, scale, config=None):
    """Run the kernel with ``shift`` (sh, sw) ints or an integer tensor [2] on q's device: ``config``
    (BLOCK_M, BLOCK_N, num_warps, num_stages) if given, else the interpreter's config, the class's default
    under HIDIFF_AUTOTUNE=0, or the autotuner's pick."""
    out = _empty_output(q)
    check_int32_span(_OP, q=q, k=k, v=v, out=out)
    B, _, heads, head_dim = q.shape
    if B > 65535 or 4 * heads > 65535:  # CUDA's grid: y (4 windows x heads) and z (batch) stop at 65535
        raise ValueError(f"{_OP}: batch {B} or heads {heads} too large for the kernel (at most 65535 and 16383)")
    in_memory = isinstance(shift, torch.Tensor)
    # Without a shift tensor, SHIFT is never read: any pointer fills the slot.
    sh, sw, shift_ptr = (0, 0, shift.to(torch.int64).contiguous()) if in_memory else (*shift, out)
    args = [q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, W, sh, sw, shift_ptr,
            scale * _LOG2E]
    consts = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), ALIGNED=_aligned(q, k, v, out),
                  SHIFT_IN_MEMORY=in_memory, UPCAST=interpreter_enabled() and q.dtype == torch.bfloat16)
    window_tokens = math.ceil(H / 2) * math.ceil(W / 2)  # the largest window (top left)
    grid = lambda meta: (triton.cdiv(window_tokens, meta["BLOCK_M"]), 4 * heads, B)
    config_class = _config_class(q.dtype, head_dim)
    if config is None and interpreter_enabled():
        config = INTERPRETER_CONFIG
    elif config is None and not autotune_enabled():
        config = CONFIGS[config_class][0]
    with launch_device(q):
        if config is None:
            _tuned_kernel(config_class)[grid](*args, **consts)
        else:
            bm, bn, w, s = config
            _msw_attention_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    return out


@torch.library.custom_op("hidiff::msw_attention", mutates_args=())
def _msw_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, H: int, W: int,
                      sh: int, sw: int, shift: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``shift``, when given, replaces (sh, sw)."""
    # checked again here: torch.ops.hidiff.msw_attention can be called without the wrapper below
    (H, W), shift, scale = check_msw_args(_OP, q, k, v, (H, W), (sh, sw) if shift is None else shift, scale)
    if triton_runs_on(q.device):
        return _launch(q, k, v, H, W, shift, scale)
    with without_autocast(q.device):
        return reference.msw_attention(q, k, v, (H, W), shift, scale)


@_msw_attention_op.register_fake
def _(q, k, v, H, W, sh, sw, shift, scale):
    return q.new_empty(q.shape)


def msw_attention(q, k, v, size, shift, scale=None):
    """Attention of each token with the tokens of its window in the 2x2 grid of the shifted map.

    q, k, v: [B, N, heads, head_dim] (any strides) with N == H * W tokens in row-major order for
    size=(H, W). The map rolled by (-sh, -sw) is split at ceil(H/2), ceil(W/2) into 4 windows and
    each token attends within its window; the result is in the original token order, q's dtype.
    shift: (sh, sw) ints with 0 <= sh < H, 0 <= sw < W, or an int32/int64 tensor [2] on q's device,
    taken modulo (H, W) on the device: never read to the host, so a CUDA graph captured once replays
    with every shift written into that tensor.
    Same function as ``hidiff_kernels.reference.msw_attention``; inference only. Under torch.autocast the inputs
    are cast as scaled_dot_product_attention's are.
    """
    q, k, v = autocast_inputs(q, k, v)
    (H, W), shift, scale = check_msw_args(_OP, q, k, v, size, shift, scale)
    check_no_grad(_OP, q, k, v)
    if isinstance(shift, torch.Tensor):
        return _msw_attention_op(q, k, v, H, W, 0, 0, shift, scale)
    return _msw_attention_op(q, k, v, H, W, *shift, None, scale)


def build_configs():
    """Every kernel variant the CUDA launcher can pick: autotune config x dtype x head-dim class (SD's head dims
    40, 64 and 128, and 160 for the class up to 256) x shift given as ints or as a tensor (the adapter's random
    window phases).

    All with ALIGNED=True, the variant diffusers' q/k/v take (head vectors contiguous and 16-byte aligned); the
    strided fallback for other layouts is not built here.
    """
    names = _msw_attention_kernel.arg_names
    scalars = {n: "i32" for n in names if n.startswith("stride_") or n in ("H", "W", "sh", "sw")}
    builds = []
    for dtype, type_name in TRITON_DTYPES.items():
        ptr = "*" + type_name
        for head_dim in (40, 64, 128, 160):
            for bm, bn, w, s in CONFIGS[_config_class(dtype, head_dim)]:
                for in_memory in (False, True):
                    signature = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, **scalars,
                                 "SHIFT": "*i64" if in_memory else ptr, "qk_scale": "fp32"}
                    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=bm, BLOCK_N=bn,
                                      ALIGNED=True, SHIFT_IN_MEMORY=in_memory, UPCAST=False)
                    builds.append(KernelBuild(
                        name=f"{_OP} {type_name} d={head_dim} BLOCK_M={bm} BLOCK_N={bn} w{w} s{s}"
                             + (" shift=tensor" if in_memory else ""),
                        fn=_msw_attention_kernel, signature={n: signature[n] for n in names if n in signature},
                        constexprs=constexprs, num_warps=w, num_stages=s, uses_tensor_cores=dtype != torch.float32,
                    ))
    return builds
