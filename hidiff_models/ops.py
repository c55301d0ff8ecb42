"""The hidiff op a backend runs, looked up by name at call time so both backends share one code path."""
import hidiff_kernels
from hidiff_kernels import reference

BACKENDS = ("auto", "triton", "torch")


def uses_triton(backend, device) -> bool:
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def kernel_op(name, backend, device):
    """Op ``name`` of hidiff_kernels (Triton) or hidiff_kernels.reference (PyTorch) for tensors on ``device``."""
    return getattr(hidiff_kernels if uses_triton(backend, device) else reference, name)
