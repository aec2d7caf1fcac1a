"""Triton kernels, installed into the package as iota.triton_kernels."""
