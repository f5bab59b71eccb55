"""The experiment runner: one resumable sweep of configurations per study.

Every study of ``ntkscale experiment NAME`` is a :class:`Study` declared in its own module,
``ntkscale/experiments/NAME.py``, and run by :func:`run_study`. The runner owns everything a
sweep needs besides the science: presets, seeds, the device, the output folder, resuming,
atomic writes, progress bars, the table at the end and the figures' files.

Adding a study (one module)::

    # src/ntkscale/experiments/mystudy.py
    from dataclasses import dataclass
    from .runner import Context, Outcome, Study, run_study

    @dataclass(frozen=True)
    class Config:                      # the preset: everything that changes the numbers
        widths: tuple[int, ...] = (64, 1024)
        steps: int = 100

    def configurations(config: dict) -> list[dict]:
        # the sweep, in order; each a small JSON-able dict that names one configuration
        return [{"width": w} for w in config["widths"]]

    def run_configuration(config: dict, configuration: dict, ctx: Context) -> Outcome:
        # the seeds are set already (ctx.configuration_seed); compute on ctx.device
        bar = ctx.progress(total=config["steps"], desc="train")   # inner progress
        ...
        return Outcome(rows=[{"width": configuration["width"], "loss": loss}],
                       extras={"curve": curve})                  # extras: for the figures

    def figures(results: dict, out: Path) -> list[Path]:
        fig, plt = new_figure(...); ...; return [save_figure(fig, out / "mystudy.png")]

    STUDY = Study(name="mystudy", presets={"quick": Config(), "full": Config(widths=...)},
                  configurations=configurations, run_configuration=run_configuration,
                  figures=figures, columns=("width", "loss"))

    def run(**kwargs):                 # what ``ntkscale experiment mystudy`` calls
        return run_study(STUDY, **kwargs)

and add its name to ``ntkscale.cli.EXPERIMENTS``.

What the runner does with it, in :func:`run_study`:

1. Picks the preset (``"quick"`` or ``"full"``), turns it into the run's *config* (a JSON dict:
   the preset's fields, ``seed``, and whatever :attr:`Study.prepare` adds, e.g. which data set
   was found under ``--data-dir``), and lists the configurations.
2. Opens ``OUT/results.json``. If it exists and holds the same study, preset and config, the
   configurations listed there as finished are skipped (resume); if it holds anything else the
   run is refused with an :class:`ExperimentError` that says how to start fresh (another
   ``--out``, or ``--fresh``, which deletes the old results and figures first).
3. Runs each remaining configuration with ``torch`` (and numpy) seeded by
   :func:`configuration_seed` of the run's seed and the configuration — never by what ran
   before it, so a resumed sweep reproduces the rows of an uninterrupted one — and after each
   writes ``results.json`` atomically (a temporary file, then ``os.replace``): a sweep killed at
   any moment leaves the last finished configuration on disk as valid JSON.
4. Prints a table of the rows (:attr:`Study.columns`) and writes the study's PNG figures.

``results.json`` holds ``{"study", "preset", "config", "environment", "configurations",
"finished", "rows", "extras", "figures"}``: ``environment`` records versions, device, threads
and the study's dtype (with one entry per later resumed session under ``"resumed"``),
``finished`` the ids (:func:`configuration_id`) of the finished configurations, ``rows`` the
table (each finished configuration's rows, in sweep order), and ``extras`` per configuration id
whatever the figures need beside the rows (curves on a grid, ...).

Device handling: ``device=None`` picks ``cuda`` when present, else ``cpu``; a named device that
this machine does not have raises :class:`ExperimentError` before anything runs. The full
preset is sized for one GPU; run on a CPU it says so and proceeds.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = [
    "Context",
    "ExperimentError",
    "Outcome",
    "Study",
    "StudyResult",
    "configuration_id",
    "configuration_seed",
    "environment",
    "format_table",
    "new_figure",
    "read_results",
    "resolve_device",
    "run_study",
    "save_figure",
    "write_json_atomic",
]

RESULTS = "results.json"
PRESETS = ("quick", "full")
_FIGURE_HINT = "pip install 'ntkscale[experiments]'"


class ExperimentError(ValueError):
    """A study cannot run as asked (unknown device, an output folder holding another sweep, ...).

    The message says what was expected, what came, and what to do instead.
    """


@dataclass
class Outcome:
    """What one configuration produced.

    Attributes:
        rows: rows of the results table (JSON-able dicts; scalars, lists, nested dicts).
        extras: anything else the figures need (JSON-able), kept under the configuration's id.
    """

    rows: list[dict]
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """A study: presets, the sweep, what one configuration computes, and its figures.

    Attributes:
        name: the study's name, as typed after ``ntkscale experiment``.
        presets: ``{"quick": ..., "full": ...}``; each a dataclass instance or a dict of
            JSON-able fields (everything that changes the numbers).
        configurations: ``config -> [configuration, ...]``, the sweep in order; each
            configuration is a small JSON-able dict (its id is :func:`configuration_id`).
        run_configuration: ``(config, configuration, ctx) -> Outcome`` (or a list of rows).
        figures: ``(results, out) -> [png paths]``, called at the end of every run with the
            whole ``results.json`` content; ``None`` for no figure.
        columns: the row keys shown in the printed table (a nested dict's entries as
            ``"key.sub"``); default all scalar keys of the first row.
        prepare: ``(config, ctx) -> config``, to complete the config before the sweep (e.g.
            record which data set was found under ``ctx.data_dir``); default unchanged.
        dtype: the study's main dtype, recorded in the environment (e.g. ``"float64"``).
        full_note: printed when the full preset runs without a GPU.
        description: one line for ``--help`` and the table's title.
    """

    name: str
    presets: Mapping[str, Any]
    configurations: Callable[[dict], list[dict]]
    run_configuration: Callable[[dict, dict, "Context"], Any]
    figures: Callable[[dict, Path], list[Path]] | None = None
    columns: Sequence[str] | None = None
    prepare: Callable[[dict, "Context"], dict] | None = None
    dtype: str = "float32"
    full_note: str = "the full preset is sized for one GPU; on a CPU expect hours (or use --quick)"
    description: str = ""


@dataclass
class Context:
    """What a configuration may use besides its config.

    Attributes:
        device: the torch device to compute on.
        seed: the run's seed (``--seed``).
        configuration_seed: the seed torch and numpy were set to for this configuration.
        data_dir: ``--data-dir`` (data sets already on disk), or ``None``.
        out: the output folder.
        show_progress: whether progress bars are shown.
        index: 0-based position of the configuration in the sweep (``-1`` in ``prepare``).
        total: number of configurations.
    """

    device: torch.device
    seed: int
    configuration_seed: int
    data_dir: Path | None
    out: Path
    show_progress: bool = True
    index: int = -1
    total: int = 0

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "") -> tqdm:
        """An inner progress bar (under the sweep's bar) for long loops and solves.

        Use as ``for x in ctx.progress(items, desc="train")`` or ``bar = ctx.progress(total=n)``
        with ``bar.update()``; the bar disappears when done.
        """
        return tqdm(
            iterable, total=total, desc=desc, leave=False, position=1, disable=not self.show_progress, dynamic_ncols=True
        )

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded by this configuration's seed (plus ``salt``)."""
        return torch.Generator().manual_seed(self.configuration_seed + int(salt))


@dataclass
class StudyResult:
    """What :func:`run_study` did.

    Attributes:
        out: the output folder.
        results: the content of ``results.json``.
        ran: ids of the configurations computed in this call.
        skipped: ids of the configurations found finished already (resumed).
        figures: the PNG files written.
        seconds: wall time of this call.
        table: the printed table.
    """

    out: Path
    results: dict
    ran: list[str]
    skipped: list[str]
    figures: list[Path]
    seconds: float
    table: str


# -- small helpers ---------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses, tuples, tensors, numpy scalars and paths."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return obj  # json writes Infinity/NaN; Python's json reads them back
    if isinstance(obj, Path):
        return str(obj)
    return obj


def configuration_id(configuration: Mapping) -> str:
    """A readable, stable id of a configuration: ``"key=value,key=value"`` in its key order."""
    parts = []
    for k, v in configuration.items():
        v = _jsonable(v)
        parts.append(f"{k}={v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}")
    return ",".join(parts)


def configuration_seed(seed: int, configuration: Mapping) -> int:
    """The seed of one configuration: CRC-32 of the run's seed and the configuration's id.

    It depends on nothing that ran before, so a resumed sweep draws the same numbers.
    """
    return zlib.crc32(f"{int(seed)}|{configuration_id(configuration)}".encode()) & 0x7FFFFFFF


def _as_created(path: str) -> None:
    """Give a ``mkstemp`` file (mode 0600) the permissions a plain ``open`` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: a temporary file in the same folder, flushed
    and synced, then ``os.replace``. On any failure (including one while serializing) the old
    file is left as it was and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(obj), indent=1)  # serialize first: a bad object never touches disk
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        _as_created(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_results(out: str | Path) -> dict | None:
    """The content of ``OUT/results.json``, or ``None`` if there is none.

    Raises:
        ExperimentError: the file is not valid JSON (the message says how to start fresh).
    """
    path = Path(out) / RESULTS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExperimentError(
            f"{path} is not valid JSON ({err}); it was not written by this runner. Use another --out, or "
            f"--fresh to replace it"
        ) from err


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, dtype: str = "float32") -> dict:
    """What a run was measured on: versions, device, threads, dtype, time."""
    from .. import __version__

    env = {
        "ntkscale": __version__,
        "torch": torch.__version__,
        "linear_operator": _version("linear_operator"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
        ),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "dtype": dtype,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return env


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → ``cuda`` if present else ``cpu``; a named device must exist on this machine.

    Raises:
        ExperimentError: the device string is malformed or the device is not present.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ExperimentError(f"--device {device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1)") from err
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if dev.index is None else dev.index
        if index >= count:
            have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA device"
            raise ExperimentError(f"--device {device!r} is not present: this machine has {have}; use --device cpu")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ExperimentError(f"--device {device!r} is not present on this machine; use --device cpu")
        return dev
    raise ExperimentError(f"--device {device!r}: expected cpu, cuda[:index] or mps")


def _flatten(row: Mapping, prefix: str = "") -> dict:
    flat = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(_flatten(v, key + "."))
        elif not isinstance(v, (list, tuple)):
            flat[key] = v
    return flat


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str = "") -> str:
    """A plain-text table of ``rows`` (nested dicts as ``key.sub`` columns; lists left out)."""
    flat = [_flatten(r) for r in rows]
    if columns is None:
        columns = list(flat[0]) if flat else []
    cells = [[_cell(f.get(c)) for c in columns] for f in flat]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(fig, axes, plt)`` from matplotlib's Agg backend (no display needed).

    Raises:
        ImportError: matplotlib is not installed (the message names the ``pip install``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(f"the studies' figures need matplotlib; install it with: {_FIGURE_HINT}") from err
    fig, axes = plt.subplots(nrows, ncols, **kwargs)
    return fig, axes, plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG atomically (temporary file, then ``os.replace``) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        _as_created(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# -- the runner ------------------------------------------------------------------------------------
def _preset_dict(study: Study, preset: str) -> dict:
    if preset not in study.presets:
        raise ExperimentError(f"study {study.name!r} has no preset {preset!r}; it has {', '.join(study.presets)}")
    p = study.presets[preset]
    return _jsonable(p if not (is_dataclass(p) and not isinstance(p, type)) else asdict(p))


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    diffs = []
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: {json.dumps(a)} there, {json.dumps(b)} now")
    return diffs


def _check_compatible(old: dict, new: dict, out: Path) -> None:
    head = {k: old.get(k) for k in ("study", "preset")}
    want = {k: new[k] for k in ("study", "preset")}
    diffs = _differences(head, want) + _differences(old.get("config", {}), new["config"], "config.")
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise ExperimentError(
            f"{out / RESULTS} holds results of another sweep ({shown}). To keep them, choose another "
            f"--out; to discard them and start fresh, rerun with --fresh."
        )


def _remove_previous(out: Path) -> None:
    """``--fresh``: delete the results file and the figures it lists (nothing else)."""
    try:
        old = read_results(out)
    except ExperimentError:
        old = None
    for name in (old or {}).get("figures", []):
        p = out / Path(name).name
        if p.is_file():
            p.unlink()
    if (out / RESULTS).exists():
        (out / RESULTS).unlink()


def run_study(
    study: Study,
    quick: bool = False,
    out: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    data_dir: str | Path | None = None,
    fresh: bool = False,
    progress: bool = True,
    figures: bool = True,
    overrides: Mapping | None = None,
    after_configuration: Callable[[int, str, Outcome], None] | None = None,
    stream=None,
) -> StudyResult:
    """Run (or resume) a study's sweep into ``out``; see the module docstring.

    Args:
        study: the :class:`Study`.
        quick: the ``"quick"`` preset (CPU, minutes) instead of ``"full"`` (one GPU).
        out: output folder (default ``results/NAME``).
        seed: the run's seed; each configuration's is :func:`configuration_seed` of it.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...; default ``cuda`` if present else ``cpu``.
        data_dir: folder of data sets already on disk (the full presets' MNIST/CIFAR-10).
        fresh: delete an existing ``results.json`` (and the figures it lists) first.
        progress: tqdm bars (sweep and inner); without them one line per configuration.
        figures: write the study's PNG figures at the end.
        overrides: preset fields to replace (tests use tiny configurations this way); they
            become part of the config, so a resumed run must pass the same ones.
        after_configuration: called as ``fn(index, id, outcome)`` after each configuration is
            written (a hook for tests and for callers that watch a sweep).
        stream: where the table and messages go (default ``sys.stdout``).

    Returns:
        A :class:`StudyResult`.

    Raises:
        ExperimentError: unknown device, an ``out`` holding another sweep, or an unknown
            preset field in ``overrides``.
        KeyboardInterrupt: (and any error of a configuration) passed on after a message saying
            how to resume; every finished configuration is on disk.
    """
    start = time.perf_counter()
    stream = stream if stream is not None else sys.stdout
    preset = "quick" if quick else "full"
    dev = resolve_device(device)
    out = Path(out) if out is not None else Path("results") / study.name
    data_path = Path(data_dir).expanduser() if data_dir is not None else None
    if data_path is not None and not data_path.is_dir():
        raise ExperimentError(f"--data-dir {str(data_dir)!r} is not a folder")

    config = _preset_dict(study, preset)
    if overrides:
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ExperimentError(f"unknown field(s) {unknown} for study {study.name!r}; it has {sorted(config)}")
        config.update(_jsonable(dict(overrides)))
    config["seed"] = int(seed)
    ctx = Context(device=dev, seed=int(seed), configuration_seed=int(seed), data_dir=data_path, out=out,
                  show_progress=progress)
    if study.prepare is not None:
        config = _jsonable(study.prepare(config, ctx))
    configurations = [_jsonable(c) for c in study.configurations(config)]
    ids = [configuration_id(c) for c in configurations]
    if len(set(ids)) != len(ids):
        raise ExperimentError(f"study {study.name!r} lists the same configuration twice: {ids}")

    if fresh:
        _remove_previous(out)
    env = environment(dev, study.dtype)
    results = {
        "study": study.name,
        "preset": preset,
        "config": config,
        "environment": env,
        "configurations": configurations,
        "finished": [],
        "rows": [],
        "extras": {},
        "figures": [],
    }
    old = read_results(out)
    if old is not None:
        _check_compatible(old, results, out)
        results.update({k: old.get(k, results[k]) for k in ("environment", "finished", "rows", "extras", "figures")})
        results["environment"].setdefault("resumed", []).append(env)
    done = set(results["finished"])
    skipped = [i for i in ids if i in done]
    todo = [(k, c, i) for k, (c, i) in enumerate(zip(configurations, ids)) if i not in done]
    if preset == "full" and dev.type == "cpu" and todo:
        print(f"ntkscale experiment {study.name}: {study.full_note}", file=stream)
    if skipped:
        print(
            f"{study.name}: resuming in {out}: {len(skipped)} of {len(ids)} configurations finished already",
            file=stream,
        )
    write_json_atomic(out / RESULTS, results)

    ran: list[str] = []
    n = len(ids)
    bar = tqdm(total=n, initial=len(skipped), desc=study.name, position=0, disable=not progress, dynamic_ncols=True)
    try:
        for k, configuration, cid in todo:
            bar.set_description(f"{study.name}: configuration {k + 1} of {n}")
            bar.set_postfix_str(cid, refresh=True)
            t0 = time.perf_counter()
            cseed = configuration_seed(seed, configuration)
            torch.manual_seed(cseed)
            np.random.seed(cseed)
            ctx = Context(device=dev, seed=int(seed), configuration_seed=cseed, data_dir=data_path, out=out,
                          show_progress=progress, index=k, total=n)
            outcome = study.run_configuration(config, configuration, ctx)
            if not isinstance(outcome, Outcome):
                outcome = Outcome(rows=list(outcome))
            seconds = time.perf_counter() - t0
            results["extras"][cid] = _jsonable({**outcome.extras, "seconds": seconds})
            results["finished"].append(cid)
            results["rows"].extend(_jsonable(r) for r in outcome.rows)
            write_json_atomic(out / RESULTS, results)
            ran.append(cid)
            bar.update(1)
            if not progress:
                print(f"{study.name}: configuration {k + 1} of {n} ({cid}) done in {seconds:.1f} s", file=stream)
            if after_configuration is not None:
                after_configuration(k, cid, outcome)
    except BaseException as err:
        bar.close()
        why = "interrupted" if isinstance(err, KeyboardInterrupt) else f"stopped by {type(err).__name__}"
        print(
            f"\n{study.name}: {why}; {len(results['finished'])} of {n} configurations are saved in "
            f"{out / RESULTS}. Run the same command again to resume.",
            file=stream,
        )
        raise
    bar.close()

    rows = results["rows"]
    title = f"{study.name} ({preset} preset, device {dev}, seed {seed})"
    table = format_table(rows, study.columns, title=title)
    print(table, file=stream)
    written: list[Path] = []
    if figures and study.figures is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # matplotlib's tight-layout chatter
            written = [Path(p) for p in study.figures(results, out)]
        results["figures"] = [p.name for p in written]
        write_json_atomic(out / RESULTS, results)
        for p in written:
            print(f"figure: {p}", file=stream)
    seconds = time.perf_counter() - start
    print(f"results: {out / RESULTS} ({len(ran)} configurations run, {len(skipped)} resumed, {seconds:.1f} s)",
          file=stream)
    return StudyResult(out=out, results=results, ran=ran, skipped=skipped, figures=written, seconds=seconds,
                       table=table)
