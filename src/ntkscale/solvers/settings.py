"""Global defaults for the iterative solvers, as context managers.

In the style of :mod:`linear_operator.settings`: a setting is used whenever the matching keyword
of :func:`ntkscale.solvers.solve` is not given (left at ``None``).

Example:
    >>> import torch
    >>> from linear_operator.operators import DenseLinearOperator
    >>> from ntkscale.solvers import settings, solve
    >>> K = DenseLinearOperator(torch.eye(3, dtype=torch.float64))
    >>> with settings.max_cg_iterations(50), settings.cg_tolerance(1e-8):
    ...     x, info = solve(K, torch.ones(3, dtype=torch.float64))
    >>> settings.cg_tolerance.value()
    0.0001
"""

from __future__ import annotations

__all__ = ["cg_tolerance", "max_cg_iterations"]


class _value_context:
    """A global value that a ``with`` block overrides and restores on exit."""

    _global_value: float | int

    @classmethod
    def value(cls) -> float | int:
        """The value in force now."""
        return cls._global_value

    @classmethod
    def _validate(cls, value):
        return value

    def __init__(self, value):
        self._instance_value = self._validate(value)
        self._orig_value = None

    def __enter__(self):
        self._orig_value = self.__class__._global_value
        self.__class__._global_value = self._instance_value
        return self

    def __exit__(self, *args) -> bool:
        self.__class__._global_value = self._orig_value
        return False


class max_cg_iterations(_value_context):
    """Default cap on CG iterations; the effective default is ``min(n, value)``.

    (Default: 1000)
    """

    _global_value = 1000

    @classmethod
    def _validate(cls, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"max_cg_iterations expects an integer >= 1, got {value!r}")
        return value


class cg_tolerance(_value_context):
    """Default relative-residual tolerance ``||rhs - (K + noise I) x|| / ||rhs||`` of CG.

    (Default: 1e-4)
    """

    _global_value = 1e-4

    @classmethod
    def _validate(cls, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"cg_tolerance expects a float > 0, got {value!r}")
        return float(value)
