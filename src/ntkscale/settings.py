"""Global settings of ntkscale, as context managers in the style of ``linear_operator.settings``.

The solver defaults (:class:`cg_tolerance`, :class:`max_cg_iterations`) live in
:mod:`ntkscale.solvers.settings` and are re-exported here beside the library-wide ones.

Example:
    >>> import ntkscale as nks
    >>> nks.settings.debug.on()
    False
    >>> with nks.settings.debug(True):
    ...     nks.settings.debug.on()
    True
"""

from __future__ import annotations

from .solvers.settings import _value_context, cg_tolerance, max_cg_iterations

__all__ = ["cg_tolerance", "debug", "max_cg_iterations"]


class debug(_value_context):
    """Extra checks on hot paths that cost a device synchronization.

    With it on, every vector an ``NTKOperator`` multiplies is checked for NaN/inf on any device.
    Off (the default), vectors on the CPU are still checked on every product (the check is
    chunked and cheap there), while vectors on a GPU are not, so that a product never waits for
    the device. Data (``X``) and parameters are always checked once, at construction.

    (Default: False)
    """

    _global_value = False

    @classmethod
    def on(cls) -> bool:
        """Whether debug checks are on now."""
        return bool(cls._global_value)

    @classmethod
    def _validate(cls, value):
        if not isinstance(value, bool):
            raise ValueError(f"debug expects True or False, got {value!r}")
        return value
