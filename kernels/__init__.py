"""Fused kernels for slimlm's replacement modules (Triton on CUDA, exact PyTorch elsewhere)."""
