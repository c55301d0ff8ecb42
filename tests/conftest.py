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


def modular_sdxl_pipeline(components):
    """diffusers' modular SDXL pipeline (every task in one class) holding ``components``; skips the test where
    diffusers has none, or one whose update_components takes only components it loaded itself (0.35.2)."""
    import diffusers

    modular_pipelines = pytest.importorskip("diffusers.modular_pipelines")
    pipe = modular_pipelines.StableDiffusionXLAutoBlocks().init_pipeline()
    try:
        pipe.update_components(**{k: v for k, v in components.items() if v is not None})
    except ValueError as e:
        if "Cannot create ComponentSpec" not in str(e):
            raise
        pytest.skip(f"modular pipelines of diffusers {diffusers.__version__} take only components they loaded")
    return pipe
