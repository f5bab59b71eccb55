"""The README's usage example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def usage_example() -> str:
    """The first ```python block of the README's "## Usage" section."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Usage\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section is not None, "README.md has no '## Usage' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S)
    assert block is not None, "the README's Usage section has no ```python block"
    return block.group(1)


def test_readme_usage_example_runs(capsys):
    code = usage_example()
    ns: dict = {"__name__": "__readme__"}
    threads = torch.get_num_threads()
    try:
        exec(compile(code, str(README) + ":Usage", "exec"), ns)
    finally:
        torch.set_num_threads(threads)
    K, d, info, mean = ns["K"], ns["d"], ns["info"], ns["mean"]
    n = ns["X"].shape[0] * ns["y"].shape[1]
    assert K.shape == (n, n)
    assert ns["Kv"].shape == (n,)
    assert d.shape == (n,) and bool((d > 0).all())
    assert info.converged and info.iterations > 0
    assert mean.shape == (ns["X_test"].shape[0], ns["y"].shape[1])
    assert bool(torch.isfinite(mean).all())
    assert capsys.readouterr().out.strip(), "the example prints the solve's summary"


def test_readme_uncertainty_example_runs(capsys):
    """The "Uncertainty, spectra and natural gradients" example runs as written."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Uncertainty, spectra and natural gradients\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section is not None
    code = re.search(r"```python\n(.*?)```", section.group(1), flags=re.S).group(1)
    ns: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README) + ":Uncertainty", "exec"), ns)
    mean, var, var_f = ns["mean"], ns["var"], ns["var_f"]
    assert mean.shape == var.shape == var_f.shape == (20, 2)
    assert bool((var >= 0).all()) and bool((var_f >= var - 1e-4).all())  # fast ones are upper bounds
    assert ns["kappa"] > 1 and ns["top"].shape == (3,)
    assert ns["info"].loss_after < ns["info"].loss_before


def _section_code(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## )", text, flags=re.M | re.S)
    assert section is not None, f"README.md has no '## {title}' section"
    return re.search(r"```python\n(.*?)```", section.group(1), flags=re.S).group(1)


def test_readme_classification_example_runs(capsys):
    ns: dict = {"__name__": "__readme__"}
    exec(compile(_section_code("Classification"), str(README) + ":Classification", "exec"), ns)
    mean, cov, p_probit, p_mc = ns["mean"], ns["cov"], ns["p_probit"], ns["p_mc"]
    assert mean.shape == (50, 3) and cov.shape == (50, 3, 3)
    for p in (p_probit, p_mc):
        assert torch.allclose(p.sum(-1), torch.ones(50), atol=1e-5)
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_readme_gpytorch_example_runs(capsys):
    ns: dict = {"__name__": "__readme__"}
    exec(compile(_section_code("GPyTorch"), str(README) + ":GPyTorch", "exec"), ns)
    assert ns["pred"].mean.shape == (30,) and bool((ns["pred"].variance > 0).all())
    assert capsys.readouterr().out.strip()


def test_readme_metrics_example_runs(capsys):
    ns: dict = {"__name__": "__readme__"}
    exec(compile(_section_code("Metrics"), str(README) + ":Metrics", "exec"), ns)
    out = capsys.readouterr().out.split()
    assert out[0] == "0.6666666666666666"  # two of three right
    assert out[-1] == "0.75"  # |y| <= 1.96 for three of four
