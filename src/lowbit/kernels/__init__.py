"""Kernel registry and kernels; importing this package registers every kernel."""

from . import cpu, reference
from .registry import Kernel, kernel_names, register_kernel, select_kernel

__all__ = ["Kernel", "cpu", "kernel_names", "reference", "register_kernel", "select_kernel"]
