"""Triton kernels, one module per op (imported only when triton is installed)."""
