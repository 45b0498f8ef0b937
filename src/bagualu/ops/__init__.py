"""Operator library: reference (PyTorch) versions are the spec; platforms may provide faster kernels.

``kernel("rms_norm")`` returns the current platform's kernel for an op when its ``kernel_backends``
names one, else the reference from ``ops.reference``.
"""

from bagualu.ops.registry import (kernel, linear_fp32_on_own_threads, linear_half_operand_dtypes,
                                  linear_matrix_unit_dtypes, linear_packer, linear_weight_dtypes, reference_names)

__all__ = ["kernel", "linear_fp32_on_own_threads", "linear_half_operand_dtypes", "linear_matrix_unit_dtypes",
           "linear_packer", "linear_weight_dtypes", "reference_names"]
