"""One module per op: the fused Triton kernels, and the plain-PyTorch window gather of the torch backend."""
