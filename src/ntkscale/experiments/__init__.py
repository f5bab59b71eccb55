"""The studies of ``ntkscale experiment NAME``, one module each, run by :mod:`.runner`.

Each study module defines ``STUDY`` (a :class:`ntkscale.experiments.runner.Study`) and
``run(**kwargs)``, which calls :func:`ntkscale.experiments.runner.run_study`. The runner's
docstring says how to add one.
"""

from __future__ import annotations

from .runner import (
    Context,
    ExperimentError,
    Outcome,
    Study,
    StudyResult,
    configuration_id,
    configuration_seed,
    read_results,
    resolve_device,
    run_study,
    write_json_atomic,
)

__all__ = [
    "Context",
    "ExperimentError",
    "Outcome",
    "Study",
    "StudyResult",
    "configuration_id",
    "configuration_seed",
    "read_results",
    "resolve_device",
    "run_study",
    "write_json_atomic",
]
