"""The dense backend: the explicit Jacobian by ``torch.func`` (``vmap`` of ``jacrev``).

The reference every other backend is tested against, and the fast path for tiny problems: the
Jacobians (N·C × P each) are built once per operator and cached, after which a product is two
GEMMs. Memory is O(N·C·P): ``backend="auto"`` only picks it when that is small.
"""

from __future__ import annotations

from torch import Tensor

from .base import Backend, KernelData, ParamVec, unflatten, flatten

__all__ = ["DenseBackend"]


class DenseBackend(Backend):
    """NTK products through explicit, cached Jacobians."""

    name = "dense"

    def _jac(self, data: KernelData, X: Tensor, name: str) -> Tensor:
        # shape: (n, C, P)
        return data.cached(name, (X,), lambda: self.jacobian(data, X))

    def _jac1(self, data: KernelData) -> Tensor:
        return self._jac(data, data.X1, "jac1")

    def _jac2(self, data: KernelData) -> Tensor:
        return self._jac1(data) if data.square else self._jac(data, data.X2, "jac2")

    def vjp(self, data: KernelData, X: Tensor, V: Tensor) -> ParamVec:
        J = self._jac2(data) if X is data.X2 else self.jacobian(data, X)
        flat = J.flatten(0, 1).T @ V.flatten(0, 1)  # (P, k)
        return unflatten(flat.T, data.params)

    def jvp(self, data: KernelData, X: Tensor, U: ParamVec) -> Tensor:
        J = self._jac1(data) if X is data.X1 else self.jacobian(data, X)
        n, C, _ = J.shape
        return (J.flatten(0, 1) @ flatten(U).T).reshape(n, C, -1)

    def matmul(self, data: KernelData, V: Tensor) -> Tensor:
        J1, J2 = self._jac1(data), self._jac2(data)
        n1, C, _ = J1.shape
        return (J1.flatten(0, 1) @ (J2.flatten(0, 1).T @ V.flatten(0, 1))).reshape(n1, C, -1)

    def diagonal(self, data: KernelData) -> Tensor:
        return self._jac1(data).square().sum(-1)

    def gram(self, data: KernelData, X1: Tensor, X2: Tensor, rows: Tensor | None = None) -> Tensor:
        J1 = self._jac1(data) if X1 is data.X1 else self.jacobian(data, X1)
        J2 = self._jac2(data) if X2 is data.X2 or (data.square and X2 is data.X1) else self.jacobian(data, X2)
        J1 = J1.flatten(0, 1)
        if rows is not None:
            J1 = J1[rows.to(J1.device)]
        return J1 @ J2.flatten(0, 1).T
