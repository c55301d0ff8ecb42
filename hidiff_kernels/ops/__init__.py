"""One module per fused Triton op."""
