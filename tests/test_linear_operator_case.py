"""linear_operator's own ``LinearOperatorTestCase`` run on an NTKOperator.

The mixin checks the operator against its dense evaluation through linear_operator's whole
algebra (matmul, indexing, solves, decompositions, ...). Tests that need what an NTK operator
deliberately does not do are skipped, each with its reason: batch dimensions (an NTKOperator is a
single matrix) and gradients with respect to the operator's representation (data and parameter
snapshots are constants).
"""

from __future__ import annotations

import unittest

import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

import ntkscale as nks

from .cases import reference_ntk

NO_BATCH = "an NTKOperator has no batch dimensions"
NO_GRAD = "an NTKOperator's data and parameters are constants (no gradient through them)"
SKIP = {
    "test_permute": NO_BATCH,
    "test_expand": NO_BATCH,
    "test_reshape": NO_BATCH,
    "test_squeeze_unsqueeze": NO_BATCH,
    "test_transpose_batch": NO_BATCH,
    "test_getitem_broadcasted_tensor_index": NO_BATCH,
    "test_matmul_matrix_broadcast": NO_BATCH,
    "test_rmatmul_matrix_broadcast": NO_BATCH,
    "test_solve_matrix_broadcast": NO_BATCH,
    "test_cat_rows": NO_BATCH,
    "test_prod": NO_BATCH,
    "test_sum": NO_BATCH,
    "test_add": NO_BATCH + " (it adds a batch of matrices)",
    "test_bilinear_derivative": NO_GRAD,
    # these evaluate the reference *from the operator's representation* and backpropagate into it
    **{
        name: NO_GRAD
        for name in (
            "test_eigh", "test_eigvalsh", "test_logdet", "test_matmul_diag_matrix",
            "test_matmul_matrix", "test_matmul_vec", "test_rmatmul_matrix", "test_rmatmul_vec",
            "test_root_decomposition", "test_solve_matrix", "test_solve_matrix_cholesky",
            "test_solve_matrix_with_left", "test_solve_vector", "test_solve_vector_with_left",
            "test_solve_vector_with_left_cholesky", "test_sqrt_inv_matmul",
            "test_sqrt_inv_matmul_no_lhs", "test_svd", "test_t_matmul_matrix",
        )
    },
    "test_half": "float16 is not a supported kernel dtype",
}


class TestNTKOperatorCase(LinearOperatorTestCase, unittest.TestCase):
    seed = 0
    should_test_sample = True
    should_call_lanczos = False  # small dense-sized problems: linear_operator uses Cholesky

    def create_linear_op(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 20), torch.nn.Tanh(), torch.nn.Linear(20, 2))
        self._X = torch.randn(5, 3)
        self._model = model
        return nks.NTKOperator(model, self._X, backend="structured")

    def evaluate_linear_op(self, linear_op):
        return reference_ntk(self._model, self._X).float()


for _name, _why in SKIP.items():
    setattr(TestNTKOperatorCase, _name, unittest.skip(_why)(lambda self: None))
