import zlib

import pytest
import torch

import hidiff_kernels


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models and small kernels: one intra-op thread avoids OpenMP spin-waits, which make CPU runs tens
    of times slower when the cores are shared, and keeps float rounding independent of the core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every test draws fresh random inputs, but from a fixed seed per test so failures reproduce.
@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


requires_interpreter = pytest.mark.skipif(
    not torch.cuda.is_available() and not hidiff_kernels.interpreter_enabled(),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1",
)


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
