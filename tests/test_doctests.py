"""The docstrings' examples run as doctests (every importable module of ``ntkscale``).

Each example is one test, named by its object. A module whose optional dependency is missing is
skipped with the import error as the reason. Examples set their own seeds; outputs compare with
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ntkscale

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
SKIP_MODULES = {"ntkscale.__main__"}  # runs the command line on import


def _collect():
    names = [ntkscale.__name__] + sorted(
        m.name for m in pkgutil.walk_packages(ntkscale.__path__, prefix="ntkscale.")
    )
    cases = []
    finder = doctest.DocTestFinder(exclude_empty=True)
    for name in names:
        if name in SKIP_MODULES:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as err:  # an optional extra that is not installed
            cases.append(pytest.param(name, None, id=name, marks=pytest.mark.skip(reason=f"{name}: {err}")))
            continue
        for test in finder.find(module, name):
            if test.examples:  # objects defined in this module only
                cases.append(pytest.param(name, test, id=test.name))
    return cases


CASES = _collect()


def test_examples_were_found():
    assert sum(1 for c in CASES if c.values[1] is not None) >= 10


@pytest.mark.parametrize("module, test", CASES)
def test_docstring_example(module, test, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    out: list[str] = []
    test.globs = dict(test.globs)
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)
