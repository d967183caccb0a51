"""Kernels of razorpass: each Triton kernel lives beside the PyTorch reference it must match.

Importing this package imports neither Triton nor any kernel module.
"""
