"""The fused MSW-MSA Triton kernel against the reference op (on CPU through the Triton interpreter)."""
import math

import pytest
import torch
from conftest import relative_error, requires_interpreter

import hidiff_kernels
from hidiff_kernels import _common, reference
from hidiff_kernels.ops import msw_attention as msw_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(B, H, W, heads, head_dim, dtype=torch.float32, magnitude=1.0):
    return [torch.randn(B, H * W, heads, head_dim, dtype=dtype, device=DEVICE) * magnitude for _ in range(3)]


def expected(q, k, v, size, shift, scale=None):
    """The reference in fp32 (fp16/bf16 inputs upcast: the oracle should not round like the kernel does)."""
    return reference.msw_attention(q.float(), k.float(), v.float(), size, shift, scale)


def window_of_each_token(H, W, sh, sw):
    """Window id (0..3) of every original token: label the rolled map's 4 windows, roll the labels back."""
    rows = (torch.arange(H) >= math.ceil(H / 2)).long()
    cols = (torch.arange(W) >= math.ceil(W / 2)).long()
    labels = rows[:, None] * 2 + cols[None, :]
    return torch.roll(labels, (sh, sw), dims=(0, 1)).flatten()


def shifts(H, W):
    """The 4 MSW-MSA shift phases plus two arbitrary shifts."""
    wh, ww = math.ceil(H / 2), math.ceil(W / 2)
    return sorted({(wh // 4 * k, ww // 4 * k) for k in range(4)} | {(H - 1, W // 3), (H // 2, W - 1)})


CASES = [  # (B, H, W, heads, head_dim): odd maps, 1 x N, N x 1, 1 x 1, windows of 2 interpreter tiles (16 tokens)
    (1, 5, 7, 2, 40),
    (2, 9, 6, 1, 64),
    (1, 1, 11, 2, 24),
    (1, 11, 1, 1, 80),
    (1, 1, 1, 1, 40),
    (1, 11, 9, 1, 72),
]


@requires_interpreter
@pytest.mark.parametrize("B,H,W,heads,head_dim", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_matches_reference(B, H, W, heads, head_dim, dtype, tol):
    q, k, v = qkv(B, H, W, heads, head_dim, dtype)
    for shift in shifts(H, W):
        out = hidiff_kernels.msw_attention(q, k, v, (H, W), shift)
        assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
        assert relative_error(out, expected(q, k, v, (H, W), shift)) < tol, shift


@requires_interpreter
@pytest.mark.parametrize("B,H,W,heads,head_dim", [(1, 5, 7, 2, 40), (1, 9, 6, 1, 64), (1, 1, 11, 1, 128)])
def test_bf16_matches_reference(B, H, W, heads, head_dim):
    q, k, v = qkv(B, H, W, heads, head_dim, torch.bfloat16)
    for shift in ((0, 0), (H - 1, W // 3), (H // 2, W - 1)):  # shifts along both axes
        out = hidiff_kernels.msw_attention(q, k, v, (H, W), shift)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, expected(q, k, v, (H, W), shift)) < 1e-2


@requires_interpreter
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_strided_inputs_and_custom_scale(dtype, tol):
    B, H, W, heads, d = 2, 6, 5, 2, 40
    qkv_proj = torch.randn(B, H * W, 3 * heads * d, dtype=dtype, device=DEVICE)  # one fused projection output
    q, k, v = (t.view(B, H * W, heads, d) for t in qkv_proj.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = hidiff_kernels.msw_attention(q, k, v, (H, W), (2, 3), scale=0.37)
    assert relative_error(out, expected(q, k, v, (H, W), (2, 3), 0.37)) < tol


@requires_interpreter
def test_head_dim_not_innermost():
    """Head vectors with a non-unit stride take the kernel's unvectorized addressing."""
    B, H, W, heads, d = 1, 7, 4, 2, 24
    q, k, v = (torch.randn(B, H * W, d, heads, device=DEVICE).transpose(2, 3) for _ in range(3))
    assert q.stride(3) != 1
    out = hidiff_kernels.msw_attention(q, k, v, (H, W), (3, 1))
    assert relative_error(out, expected(q, k, v, (H, W), (3, 1))) < 1e-5


def nan_output(q):
    return torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)


# Every config the CUDA launcher can pick, each at a padded head dim of its class (fp32 configs on fp32
# inputs, the others on fp16). The map is 9 x (2c - 1), uneven windows: its largest (5 x c tokens) spans more
# than one query tile and more than two key tiles of the config, with tails. Under the interpreter this
# checks each tile shape's logic; on CUDA the compiled code.
CONFIG_CASES = [
    (torch.float32 if fp32 else torch.float16, {64: 40, 128: 80, 256: 160}[block] + (8 if fp32 else 0), config)
    for (fp32, block), configs in msw_module.CONFIGS.items() for config in configs
]


@pytest.mark.all_configs
@requires_interpreter
@pytest.mark.parametrize("dtype,head_dim,config", CONFIG_CASES, ids=[f"{c[0]}-d{c[1]}-{c[2]}" for c in CONFIG_CASES])
def test_every_cuda_config_matches_reference(monkeypatch, dtype, head_dim, config):
    monkeypatch.setattr(msw_module, "_empty_output", nan_output)
    block_m, block_n = config[:2]
    window_cols = (max(block_m, 2 * block_n) + 7) // 5 + 1
    H, W = 9, 2 * window_cols - 1
    shift = (3, W - 2)
    q, k, v = qkv(1, H, W, 1, head_dim, dtype)
    want = expected(q, k, v, (H, W), shift)
    # The shift as ints and as a device tensor (the adapter's random phases), here one window wrap away.
    for given in (shift, torch.tensor([shift[0] + H, shift[1] - W], device=DEVICE)):
        out = msw_module._launch(q, k, v, H, W, given, head_dim**-0.5, config=config)
        assert not out.isnan().any()
        assert relative_error(out, want) < {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]


@requires_interpreter
@pytest.mark.parametrize("B,H,W,heads,head_dim", [(2, 5, 7, 2, 24), (1, 1, 11, 2, 40), (1, 9, 1, 1, 16), (1, 16, 16, 1, 64)])
def test_every_output_element_is_written(monkeypatch, B, H, W, heads, head_dim):
    monkeypatch.setattr(msw_module, "_empty_output", nan_output)
    q, k, v = qkv(B, H, W, heads, head_dim)
    out = hidiff_kernels.msw_attention(q, k, v, (H, W), (H // 2, W // 2))
    assert not out.isnan().any()
    assert relative_error(out, expected(q, k, v, (H, W), (H // 2, W // 2))) < 1e-5


@requires_interpreter
def test_large_fp16_scores_stay_finite():
    """Scores around 1e5 would overflow fp16: the kernel keeps them in fp32."""
    B, H, W, heads, d = 1, 6, 6, 2, 64
    q, k, v = qkv(B, H, W, heads, d, torch.float16, magnitude=60.0)
    out = hidiff_kernels.msw_attention(q, k, v, (H, W), (1, 2))
    assert out.isfinite().all()
    assert relative_error(out, expected(q, k, v, (H, W), (1, 2))) < 3e-3


@requires_interpreter
@pytest.mark.parametrize("poisoned", ["k", "v"])
def test_nan_spreads_to_its_window_only(poisoned):
    B, H, W, heads, d, shift = 1, 7, 6, 2, 16, (2, 5)
    inputs = dict(zip("qkv", qkv(B, H, W, heads, d)))
    token = 9
    inputs[poisoned][0, token, 1] = float("nan")
    out = hidiff_kernels.msw_attention(*inputs.values(), (H, W), shift)
    windows = window_of_each_token(H, W, *shift)
    same_window = (windows == windows[token]).to(out.device)
    assert out[0, same_window, 1].isnan().all()  # every query of the window saw the NaN key/value
    assert not out[0, ~same_window, 1].isnan().any() and not out[:, :, 0].isnan().any()


@requires_interpreter
def test_deterministic():
    q, k, v = qkv(2, 9, 6, 2, 40, torch.float16)
    first = hidiff_kernels.msw_attention(q, k, v, (9, 6), (1, 1))
    assert torch.equal(first, hidiff_kernels.msw_attention(q, k, v, (9, 6), (1, 1)))


@requires_interpreter
def test_torch_compile_fullgraph():
    """One opaque op for torch.compile, the kernel inside it."""
    q, k, v = qkv(1, 5, 4, 2, 16)
    compiled = torch.compile(lambda q, k, v: hidiff_kernels.msw_attention(q, k, v, (5, 4), (2, 1)), fullgraph=True)
    assert relative_error(compiled(q, k, v), expected(q, k, v, (5, 4), (2, 1))) < 1e-5


@requires_interpreter
def test_torch_compile_symbolic_shift():
    """A shift that is a symbolic int under compile reaches the op without specializing the graph: one graph for
    every shift, each result right."""
    q, k, v = qkv(1, 6, 5, 2, 16)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def windowed(q, k, v, shift_size):  # the shift is read from a tensor size (marked dynamic below)
        return hidiff_kernels.msw_attention(q, k, v, (6, 5), (shift_size.shape[0] - 2, 1))

    torch._dynamo.reset()
    compiled = torch.compile(windowed, backend=counting_backend, fullgraph=True)
    for sh in (0, 3, 5, 1):
        shift_size = torch.empty(sh + 2, 0)
        torch._dynamo.maybe_mark_dynamic(shift_size, 0)
        assert relative_error(compiled(q, k, v, shift_size), expected(q, k, v, (6, 5), (sh, 1))) < 1e-5, sh
    assert len(graphs) == 1
    torch._dynamo.reset()


def test_export_with_a_dynamic_batch():
    """torch.export of a module calling the op keeps the batch size symbolic (the argument checks must not guard
    it against the other sizes): the exported program runs a larger batch than it was traced with."""
    class Windowed(torch.nn.Module):
        def forward(self, q, k, v):
            return hidiff_kernels.msw_attention(q, k, v, (5, 4), (2, 1))

    batch = {0: torch.export.Dim("batch")}
    exported = torch.export.export(Windowed(), tuple(qkv(3, 5, 4, 2, 8)), dynamic_shapes=(batch, batch, batch))
    q, k, v = qkv(30, 5, 4, 2, 8)
    assert relative_error(exported.module()(q, k, v), expected(q, k, v, (5, 4), (2, 1))) < 1e-5


@requires_interpreter
@pytest.mark.parametrize("shift_dtype", [torch.int64, torch.int32])
def test_shift_tensor(shift_dtype):
    """A shift given as a tensor (how the adapter passes random window phases) is read on the device modulo the
    size: under torch.compile one graph serves every value, with no int input for CUDA graphs to re-record on."""
    B, H, W = 2, 7, 6
    q, k, v = qkv(B, H, W, 2, 16)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, shift: hidiff_kernels.msw_attention(q, k, v, (H, W), shift),
                             backend=counting_backend, fullgraph=True)
    for sh, sw in ((0, 0), (3, 5), (6, 2), (H + 2, -1), (-3, 4 * W + 1)):
        want = expected(q, k, v, (H, W), (sh % H, sw % W))
        shift = torch.tensor([sh, sw], dtype=shift_dtype, device=DEVICE)
        assert relative_error(hidiff_kernels.msw_attention(q, k, v, (H, W), shift), want) < 1e-5, (sh, sw)
        assert relative_error(compiled(q, k, v, shift), want) < 1e-5, (sh, sw)
    assert len(graphs) == 1 and not [x for x in graphs[0] if isinstance(x, (int, torch.SymInt))]
    torch._dynamo.reset()


@requires_interpreter
def test_custom_op_registration():
    """Schema, fake (meta) implementation and AOT dispatch agree with the real op."""
    q, k, v = qkv(1, 5, 4, 2, 16)
    torch.library.opcheck(torch.ops.hidiff.msw_attention.default, (q, k, v, 5, 4, 2, 1, None, 0.25))
    torch.library.opcheck(torch.ops.hidiff.msw_attention.default, (q, k, v, 5, 4, 0, 0, torch.tensor([2, 1], device=DEVICE), 0.25))


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    assert torch.equal(hidiff_kernels.msw_attention(q, k, v, (4, 5), (1, 2)),
                       reference.msw_attention(q, k, v, (4, 5), (1, 2)))


@pytest.mark.parametrize("triton_version,numpy_version,refused",
                         [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.1", False)])
def test_interpreter_with_incompatible_numpy_is_refused(monkeypatch, triton_version, numpy_version, refused):
    """triton < 3.7's interpreter cannot run on numpy >= 2.4: a clear error instead of an InterpreterError."""
    monkeypatch.setattr(_common, "interpreter_enabled", lambda: True)
    monkeypatch.setattr(_common.triton, "__version__", triton_version)
    monkeypatch.setattr(_common.np, "__version__", numpy_version)
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    if refused:
        with pytest.raises(RuntimeError, match=r"numpy<2\.4 or triton>=3\.7"):
            hidiff_kernels.msw_attention(q, k, v, (4, 5), (1, 2))
    else:
        assert hidiff_kernels.triton_runs_on(q.device)


def test_inputs_requiring_grad_raise():
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    k.requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        hidiff_kernels.msw_attention(q, k, v, (4, 5), (0, 0))
    with torch.no_grad():
        hidiff_kernels.msw_attention(q, k, v, (4, 5), (0, 0))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(q=torch.randn(1, 12, 16)), ValueError, r"q must be \[B, N, heads, head_dim\]"),
        (dict(size=(4, 4)), ValueError, "N=12"),
        (dict(shift=(0, 4)), ValueError, "shift"),
        (dict(v=torch.randn(1, 12, 2, 8, dtype=torch.bfloat16)), TypeError, "dtype"),
        (dict(q=torch.ones(1, 12, 2, 8, dtype=torch.int64)), TypeError, "dtype"),
        (dict(k=torch.randn(1, 12, 2, 8, device="meta")), ValueError, "meta"),
        (dict(q=torch.randn(1, 12, 1, 257), k=torch.randn(1, 12, 1, 257), v=torch.randn(1, 12, 1, 257)), ValueError, "head_dim"),
        (dict(q=torch.randn(0, 12, 2, 8), k=torch.randn(0, 12, 2, 8), v=torch.randn(0, 12, 2, 8)), ValueError, "empty"),
        (dict(scale=float("nan")), TypeError, "scale"),
        (dict(scale=1e39), TypeError, "scale"),  # finite in Python, inf as the kernels' fp32
    ],
)
def test_bad_input_raises(change, error, match):
    args = dict(q=torch.randn(1, 12, 2, 8), k=torch.randn(1, 12, 2, 8), v=torch.randn(1, 12, 2, 8), size=(3, 4), shift=(1, 1))
    args.update(change)
    with pytest.raises(error, match=match):
        hidiff_kernels.msw_attention(**args)


def test_registered_op_checks_its_arguments():
    # torch.ops.hidiff.msw_attention skips the public wrapper: its own checks stop a shift the kernel would
    # read out of bounds with (it wraps an index once at most)
    q = torch.randn(1, 16, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.hidiff.msw_attention(q, q, q, 4, 4, 9, 0, None, 0.35)
    with pytest.raises(ValueError, match="N=16"):
        torch.ops.hidiff.msw_attention(q, q, q, 4, 5, 0, 0, None, 0.35)


@pytest.mark.parametrize("shape,strides,match", [
    ((1, 4, 1, 16), (2**33, 2**30, 16, 1), "spans 2\\*\\*31"),  # token stride 2**30: the 3rd token is past int32
    ((65536, 1, 1, 16), (16, 16, 16, 1), "batch 65536"),  # CUDA grid z
    ((1, 1, 16384, 16), (2**18, 2**18, 16, 1), "heads 16384"),  # CUDA grid y: 4 windows x heads
])
def test_launcher_refuses_what_the_kernel_cannot_index(shape, strides, match):
    q = torch.empty_strided(shape, strides, device="meta")  # no memory behind the strides
    with pytest.raises(ValueError, match=match):
        msw_module._launch(q, q, q, 1, shape[1], (0, 0), 0.25)
