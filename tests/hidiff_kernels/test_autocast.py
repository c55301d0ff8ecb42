"""Under torch.autocast the ops cast their inputs as F.conv2d and scaled_dot_product_attention do (diffusers'
training scripts run validation pipelines under autocast): to the autocast dtype, mixed dtypes included."""
import pytest
import torch
import torch.nn.functional as F

import hidiff_kernels
from hidiff_kernels import _common, reference
from hidiff_kernels.ops.window_gather import msw_attention_gathered

from conftest import requires_interpreter

LIBRARIES = [pytest.param(hidiff_kernels, id="triton", marks=requires_interpreter),
             pytest.param(reference, id="reference")]


CASES = {  # op -> (call, shapes of its tensor arguments)
    "rau_downsample_conv": (lambda lib, x, w, b: lib.rau_downsample_conv(x, w, b), [(1, 6, 5, 7), (4, 6, 3, 3), (4,)]),
    "upsample_conv": (lambda lib, x, w, b: lib.upsample_conv(x, w, b, size=(9, 12)), [(1, 6, 5, 7), (4, 6, 3, 3), (4,)]),
    "msw_attention": (lambda lib, q, k, v: lib.msw_attention(q, k, v, (5, 7), (2, 3)), [(1, 35, 2, 8)] * 3),
}


@pytest.mark.parametrize("op", CASES)
@pytest.mark.parametrize("lib", LIBRARIES)
def test_ops_follow_autocast(lib, op):
    call, shapes = CASES[op]
    inputs = [torch.randn(shape) for shape in shapes]
    half = [t.half() for t in inputs]
    expected = call(lib, *half)
    with torch.autocast("cpu", dtype=torch.float16):
        for args in (inputs, [half[0], *inputs[1:]]):  # float32, and a mix as autocast leaves it
            out = call(lib, *args)
            assert out.dtype == torch.float16
            assert torch.equal(out, expected)


def test_reference_conv_under_autocast_is_torch_conv():
    x, w, b = torch.randn(1, 6, 5, 7), torch.randn(4, 6, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference.rau_downsample_conv(x, w, b),
                           F.conv2d(x, w, b, stride=4, padding=2, dilation=2))


RAW_OPS = {  # the registered ops, called without the wrappers' autocast cast
    "rau_downsample_conv": lambda x, w, b: torch.ops.hidiff.rau_downsample_conv(x, w, b),
    "upsample_conv": lambda x, w, b: torch.ops.hidiff.upsample_conv(x, w, b, [9, 12], None),
    "msw_attention": lambda q, k, v: torch.ops.hidiff.msw_attention(q, k, v, 5, 7, 2, 3, None, 0.5),
}


@pytest.mark.parametrize("op", RAW_OPS)
@pytest.mark.parametrize("kernel", [pytest.param(True, id="triton", marks=requires_interpreter),
                                    pytest.param(False, id="reference-fallback")])
def test_registered_ops_return_their_inputs_dtype_under_autocast(monkeypatch, kernel, op):
    # as their fake does, whichever implementation runs
    if not kernel:
        monkeypatch.setattr(_common, "interpreter_enabled", lambda: False)
    inputs = [torch.randn(shape) for shape in CASES[op][1]]
    with torch.autocast("cpu", dtype=torch.float16):
        assert RAW_OPS[op](*inputs).dtype == torch.float32


def test_window_gather_follows_autocast_as_msw_attention():  # the torch backend's MSW-MSA
    q, k, v = (torch.randn(1, 35, 2, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.float16):
        out = msw_attention_gathered(q.half(), k, v, (5, 7), (2, 3))  # uneven windows
        expected = reference.msw_attention(q, k, v, (5, 7), (2, 3))
    assert out.dtype == expected.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=3e-3, atol=3e-3)
