"""Session-wide test settings: the ``slow`` and ``cuda`` markers, and exact float32 matmuls.

* Tests marked ``slow`` (long studies, large benchmarks) run only with ``pytest --run-slow``.
* Tests marked ``cuda`` skip cleanly when ``torch.cuda.is_available()`` is False.
* TF32 is switched off for the whole session: tests compare against float32/float64 references,
  and TF32 matmuls on Ampere+ GPUs carry only ~10 mantissa bits.
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run tests marked slow (long studies and large benchmarks)",
    )


def pytest_configure(config: pytest.Config) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    has_cuda = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow test: run with `pytest --run-slow` to include it")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(skip_slow)
        if item.get_closest_marker("cuda") is not None and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True, scope="session")
def _no_tf32():
    """Keep TF32 off for the whole session, even if a test module switched it on at import."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
