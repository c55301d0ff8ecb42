"""The hidiff op a backend runs, looked up by name at call time so both backends share one code path."""
import hidiff_kernels
from hidiff_kernels import reference

BACKENDS = ("auto", "triton", "torch")


def uses_triton(backend, device) -> bool:
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def kernel_op(name, backend, device):
    """Op ``name`` of hidiff_kernels (Triton) or hidiff_kernels.reference (PyTorch) for tensors on ``device``."""
    return getattr(hidiff_kernels if uses_triton(backend, device) else reference, name)


def is_wrapped(module) -> bool:
    """Whether something runs around ``module``'s forward: torch hooks, or a forward set on the instance (diffusers'
    HookRegistry, accelerate's offload hooks)."""
    return "forward" in module.__dict__ or bool(module._forward_pre_hooks or module._forward_hooks)
