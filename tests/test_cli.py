"""The ``ntkscale`` command line: info, version, the demo on its quick preset, placeholders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ntkscale
from ntkscale.cli import collect_info, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert ntkscale.__version__ in capsys.readouterr().out


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "linear_operator", "gpytorch", "cuda_available", "threads"):
        assert key in out
    assert torch.__version__ in out


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info == {**collect_info(), "threads": info["threads"], "interop_threads": info["interop_threads"]}


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_unknown_experiment_is_a_usage_error(capsys):
    assert main(["experiment", "no-such-study"]) == 2
    err = capsys.readouterr().err
    assert "regression1d" in err and "continual" in err


def test_python_dash_m():
    run = subprocess.run(
        [sys.executable, "-m", "ntkscale", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert ntkscale.__version__ in run.stdout


@pytest.mark.parametrize("command", [["demo"], ["experiment", "regression1d"]])
def test_threads_below_one_are_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--threads", "0"])
    assert exc.value.code == 2
    assert "--threads: must be >= 1, got 0" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored
    text = capsys.readouterr().out
    assert "NTK regression" in text and "nystrom" in text

    result = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").stat().st_size > 0
    assert set(result["solves"]) == {"none", "jacobi", "nystrom"}
    for r in result["solves"].values():
        assert r["iterations"] > 0
        assert r["converged"], r
        assert r["residual_norm"] <= result["config"]["tol"] * 1.01
    m = result["metrics"]
    for who in ("net", "ntk"):
        for split in ("train", "test"):
            assert 0.0 <= m[who][split]["accuracy"] <= 1.0
            assert m[who][split]["mse"] >= 0.0
    # The three solves answer the same system.
    assert max(m["alpha_rel_diff"].values()) < 1e-2
    # The NTK predictor fits the training data at least as well as the trained net does.
    assert m["ntk"]["train"]["mse"] <= m["net"]["train"]["mse"] + 1e-6
    assert result["operator"]["shape"] == [result["config"]["n_train"] * 10] * 2
    assert torch.get_num_threads() >= 1


def test_bench_runs_a_quick_preset_with_progress_and_a_summary(tmp_path, capfd):
    """`ntkscale bench --quick --only matvec` announces the suite as k of n, runs the script,
    writes its JSON and ends with a table of suites, status and time."""
    assert main(["bench", "--quick", "--only", "matvec", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "matvec.json").read_text())
    assert doc["ratios"]["autodiff_1_over_train_step"] > 0
    out = capfd.readouterr().out
    assert "[1/1] matvec:" in out and "[1/1] matvec: ok in" in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("suite"))
    assert lines[head].split() == ["suite", "status", "time", "JSON"]
    assert set(lines[head + 1].replace(" ", "")) == {"-"}
    assert lines[head + 2].split()[:2] == ["matvec", "ok"]


@pytest.mark.slow
def test_bench_quick_prints_tables_not_dicts(tmp_path, capfd):
    """The whole quick suite (minutes): every suite runs, and no script prints a raw dict."""
    from ntkscale.cli import bench_suites

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out
    n = len(bench_suites())
    for k in range(1, n + 1):
        assert f"[{k}/{n}]" in out
    assert not [line for line in out.splitlines() if line.lstrip().startswith("{")]


def test_bench_unknown_suite_is_refused_with_the_list(capsys):
    """`ntkscale bench --only nosuch` names the known suites and exits non-zero, running nothing."""
    from ntkscale.cli import bench_suites

    assert main(["bench", "--only", "matvec", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "'nosuch'" in err and "'matvec'" not in err
    suites = bench_suites()
    assert {"matvec", "crossover", "gram", "auto"} <= set(suites)
    for name in suites:
        assert name in err


def test_bench_takes_suites_by_position(capsys):
    """`ntkscale bench peers nosuch` reads the suite names as `--only` does (and refuses the
    unknown one before running anything)."""
    assert main(["bench", "peers", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "'nosuch'" in err and "'peers'" not in err
