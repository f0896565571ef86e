"""Attention kernels: one folder per op (Triton kernel, wrapper, ``naive.py`` reference)."""
