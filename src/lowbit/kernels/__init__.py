"""Kernel registry and kernels; importing this package registers every kernel."""

from . import avx512, cpu, cuda, intx, onednn_conv, onednn_linear, reference
from .registry import Kernel, kernel_names, register_kernel, select_kernel

__all__ = ["Kernel", "avx512", "cpu", "cuda", "kernel_names", "onednn_conv", "onednn_linear", "reference", "register_kernel", "select_kernel"]
