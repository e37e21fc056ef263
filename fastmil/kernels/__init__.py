"""Triton kernels (imported lazily by fastmil.ops)."""
