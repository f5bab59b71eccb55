"""The experiment runner: resume, refusal of another sweep's folder, atomic writes, devices."""

from __future__ import annotations

import io
import json

import pytest
import torch

from ntkscale.experiments import (
    ExperimentError,
    Outcome,
    Study,
    configuration_id,
    configuration_seed,
    read_results,
    resolve_device,
    run_study,
    write_json_atomic,
)

CALLS: list[str] = []


def _configurations(config: dict) -> list[dict]:
    return [{"width": w} for w in config["widths"]]


def _run(config: dict, configuration: dict, ctx) -> Outcome:
    CALLS.append(configuration_id(configuration))
    draw = torch.randn(3, generator=None).tolist()  # global RNG: seeded per configuration
    return Outcome(
        rows=[{"width": configuration["width"], "value": sum(draw) * configuration["width"], "nested": {"a": 1.0}}],
        extras={"draw": draw},
    )


TOY = Study(
    name="toy",
    presets={"quick": {"widths": [1, 2, 3], "scale": 1.0}, "full": {"widths": [1, 2, 3, 4], "scale": 1.0}},
    configurations=_configurations,
    run_configuration=_run,
    columns=("width", "value", "nested.a"),
)


def _quiet(**kw):
    return dict(quick=True, progress=False, figures=False, device="cpu", stream=io.StringIO(), **kw)


def test_results_file_layout(tmp_path):
    res = run_study(TOY, out=tmp_path, seed=3, **_quiet())
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["study"] == "toy" and data["preset"] == "quick"
    assert data["config"] == {"widths": [1, 2, 3], "scale": 1.0, "seed": 3}
    for key in ("torch", "device", "threads", "dtype"):
        assert key in data["environment"]
    assert [r["width"] for r in data["rows"]] == [1, 2, 3]
    assert data["finished"] == ["width=1", "width=2", "width=3"]
    assert res.ran == data["finished"] and res.skipped == []
    assert "nested.a" in res.table and "value" in res.table


def test_resume_skips_finished_and_reproduces_rows(tmp_path):
    full = run_study(TOY, out=tmp_path / "whole", **_quiet()).results["rows"]

    def stop_after_first(index, cid, outcome):
        if index == 0:
            raise KeyboardInterrupt

    CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        run_study(TOY, out=tmp_path / "cut", after_configuration=stop_after_first, **_quiet())
    saved = read_results(tmp_path / "cut")
    assert saved["finished"] == ["width=1"] and len(saved["rows"]) == 1  # on disk when interrupted
    assert CALLS == ["width=1"]

    CALLS.clear()
    res = run_study(TOY, out=tmp_path / "cut", **_quiet())
    assert CALLS == ["width=2", "width=3"]  # the finished one is not run again
    assert res.skipped == ["width=1"] and res.ran == ["width=2", "width=3"]
    assert res.results["rows"] == full
    assert len(res.results["environment"]["resumed"]) == 1

    CALLS.clear()
    again = run_study(TOY, out=tmp_path / "cut", **_quiet())  # all finished: nothing runs
    assert CALLS == [] and again.results["rows"] == full


def test_seeds_depend_on_configuration_not_order():
    assert configuration_seed(0, {"width": 2}) == configuration_seed(0, {"width": 2})
    assert configuration_seed(0, {"width": 2}) != configuration_seed(1, {"width": 2})
    assert configuration_seed(0, {"width": 2}) != configuration_seed(0, {"width": 3})


def test_another_config_is_refused(tmp_path):
    run_study(TOY, out=tmp_path, **_quiet())
    for kwargs in ({"seed": 1}, {"overrides": {"scale": 2.0}}):
        with pytest.raises(ExperimentError, match="--fresh") as err:
            run_study(TOY, out=tmp_path, **_quiet(**kwargs))
        assert "another --out" in str(err.value)
    with pytest.raises(ExperimentError, match="preset"):
        run_study(TOY, out=tmp_path, **{**_quiet(), "quick": False})
    other = Study(name="other", presets=TOY.presets, configurations=_configurations, run_configuration=_run)
    with pytest.raises(ExperimentError, match="study"):
        run_study(other, out=tmp_path, **_quiet())
    # --fresh discards the old sweep and starts over
    res = run_study(TOY, out=tmp_path, fresh=True, **_quiet(seed=1))
    assert res.skipped == [] and read_results(tmp_path)["config"]["seed"] == 1


def test_unknown_override_and_invalid_results_file(tmp_path):
    with pytest.raises(ExperimentError, match="unknown field"):
        run_study(TOY, out=tmp_path, **_quiet(overrides={"nope": 1}))
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ExperimentError, match="not valid JSON"):
        run_study(TOY, out=tmp_path, **_quiet())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"rows": [1, 2]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"rows": [object()]})  # fails while serializing
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_device_not_present():
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ExperimentError, match="not present"):
        resolve_device(missing)
    with pytest.raises(ExperimentError, match="not a torch device"):
        resolve_device("gpu-please")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")


def test_configuration_error_keeps_finished_ones(tmp_path):
    def boom(config, configuration, ctx):
        if configuration["width"] == 2:
            raise RuntimeError("solver diverged")
        return _run(config, configuration, ctx)

    bad = Study(name="toy", presets=TOY.presets, configurations=_configurations, run_configuration=boom)
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        run_study(bad, out=tmp_path, quick=True, progress=False, figures=False, device="cpu", stream=stream)
    assert "Run the same command again to resume" in stream.getvalue()
    assert read_results(tmp_path)["finished"] == ["width=1"]
