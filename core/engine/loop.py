"""The outer loop shared by every distiller: seeding, callbacks, checkpoints, resume, saving."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, write_json
from ..data import DatasetSplits
from ..errors import ConfigError, DDSuiteError, NonFiniteError
from ..evaluation import EvaluationProtocol
from ..methods import Distiller, MethodConfig, config_from_dict, get_method
from ..provenance import timestamp
from ..synthetic import (
    ARTIFACT_FORMAT,
    META_FILE,
    TENSORS_FILE,
    SyntheticSet,
    is_artifact,
    load_artifact,
    save_artifact,
)
from .callbacks import Callback

__all__ = ["CHECKPOINT_FILE", "DistillResult", "RunContext", "distill", "prepare_out_dir",
           "scenario_status"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FILE = "run.json"
LOCK_FILE = ".ddsuite.lock"
# Everything ddsuite writes into a run or report folder; --overwrite removes nothing else.
OWN_ENTRIES = frozenset({
    RUN_FILE, META_FILE, TENSORS_FILE, CHECKPOINT_FILE, LOCK_FILE, "metrics.json",
    "summary.md", "grid.png", "scenario.yaml", "grids", "sets", "evaluations", "tensorboard",
    "plots",
})


@dataclass
class RunContext:
    """What callbacks see of a running distillation."""

    method: str
    distiller: Distiller
    syn: SyntheticSet
    splits: DatasetSplits
    device: torch.device
    seed: int
    iterations: int
    out_dir: Path | None
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillResult:
    """The finished set and where (if anywhere) it was written."""

    syn: SyntheticSet
    config: MethodConfig
    protocol: EvaluationProtocol
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    seconds: float
    out_dir: Path | None
    meta: dict[str, Any] = field(default_factory=dict)
    """The distiller's own artifact metadata (a private run's spent budget)."""


def _iteration_seed(seed: int, iteration: int) -> int:
    """A seed per iteration, so iteration i does the same work fresh or resumed."""
    return (seed * 1_000_003 + iteration * 7_919 + 1) % (2**63 - 1)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_ddsuite_folder(out_dir: Path) -> bool:
    """Whether `out_dir` holds a run.json, artifact.json or scenario report ddsuite wrote."""
    run = _read_json(out_dir / RUN_FILE)
    if isinstance(run, dict) and isinstance(run.get("key"), dict) and "method" in run["key"]:
        return True
    if isinstance(run, dict) and isinstance(run.get("scenario"), str):
        return True
    meta = _read_json(out_dir / META_FILE)
    if isinstance(meta, dict) and meta.get("format") == ARTIFACT_FORMAT:
        return True
    metrics = _read_json(out_dir / "metrics.json")
    return (out_dir / "scenario.yaml").is_file() and isinstance(metrics, dict) \
        and "scenario" in metrics


# What ddsuite writes inside its own subfolders (anything else there is the user's).
_OWN_CHILDREN = {
    "grids": re.compile(r"iteration_\d+\.png"),
    "evaluations": re.compile(r"evaluation-\d+\.json"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
    "plots": re.compile(r"[\w.-]+\.png"),
}


def _foreign_entries(out_dir: Path, prefix: str = "") -> list[str]:
    """Paths under `out_dir` that ddsuite does not write, at any depth."""
    foreign = []
    for entry in sorted(out_dir.iterdir()):
        name = prefix + entry.name
        if entry.name not in OWN_ENTRIES or entry.is_symlink():
            foreign.append(name)
        elif entry.name == "sets" and entry.is_dir():
            for run in sorted(entry.iterdir()):
                if run.is_dir() and not run.is_symlink() and _is_ddsuite_folder(run):
                    foreign += _foreign_entries(run, f"{name}/{run.name}/")
                else:
                    foreign.append(f"{name}/{run.name}")
        elif entry.name in _OWN_CHILDREN and entry.is_dir():
            pattern = _OWN_CHILDREN[entry.name]
            foreign += [f"{name}/{c.name}" for c in sorted(entry.iterdir())
                        if not (c.is_file() and not c.is_symlink() and pattern.fullmatch(c.name))]
        elif entry.is_dir() and entry.name not in _OWN_CHILDREN:
            foreign.append(name + "/")
    return foreign


@contextlib.contextmanager
def scenario_status(out_dir: Path, scenario: str):
    """Record a scenario report's status in its `run.json`: running, then finished, failed
    or interrupted, so a report folder left by a failed run is known as ddsuite's own (and
    `--overwrite` may replace it)."""
    record = {"scenario": scenario, "status": "running", "started": timestamp()}
    with RunLock(out_dir):  # another process may not --overwrite a live report
        write_json(out_dir / RUN_FILE, record)
        try:
            yield
        except KeyboardInterrupt:
            write_json(out_dir / RUN_FILE,
                       {**record, "status": "interrupted", "ended": timestamp()})
            raise
        except BaseException as exc:
            write_json(out_dir / RUN_FILE, {**record, "status": "failed", "ended": timestamp(),
                                            "error": f"{type(exc).__name__}: {exc}"})
            raise
        write_json(out_dir / RUN_FILE, {**record, "status": "finished", "ended": timestamp()})


def prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool,
                    can_resume: bool = True) -> None:
    """Create `out_dir`, or refuse an existing one unless resuming or overwriting a run.

    `can_resume` False (scenario reports, which cannot be resumed) leaves --resume out of the
    advice given for an existing folder.

    `overwrite` only replaces a folder that ddsuite wrote and that holds nothing else: a
    folder with any file or subfolder ddsuite does not write is refused with their names.
    """
    if resume and overwrite:
        raise ConfigError(["--resume and --overwrite exclude each other; choose one"])
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError([f"output path {out_dir} exists and is not a folder"])
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if RunLock(out_dir).is_live():
            raise ConfigError([f"{out_dir} is in use by another ddsuite process; wait for it "
                               "or stop it"])
        if not _is_ddsuite_folder(out_dir) and not (out_dir / CHECKPOINT_FILE).is_file():
            if resume or overwrite:
                raise ConfigError([f"{out_dir} is not a ddsuite run folder (no run.json, "
                                   "artifact.json or scenario report ddsuite wrote); "
                                   "choose another --out"])
        if resume:
            return
        if not overwrite:
            advice = "--resume to continue the run in it, " if can_resume else ""
            raise ConfigError([
                f"output folder {out_dir} already exists; pass {advice}--overwrite to "
                "replace it, or choose another --out"
            ])
        foreign = _foreign_entries(out_dir)
        if foreign:
            listed = f" (not written by ddsuite: {', '.join(foreign[:8])})"
            raise ConfigError([
                f"refusing to overwrite {out_dir}: it is not a ddsuite run folder{listed}; "
                "choose another --out"
            ])
        for entry in out_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif resume:
        raise ConfigError([f"nothing to resume: {out_dir} does not exist or is empty"])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError([f"cannot create output folder {out_dir}: {exc.strerror}"]) from None


class RunLock:
    """An exclusive lock file in a run folder, so two processes never write one run."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self.held = False

    def __enter__(self) -> "RunLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise ConfigError([f"{self.path.parent} is in use by another ddsuite process "
                                   f"(lock {self.path}); wait for it or stop it"]) from None
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise ConfigError([f"cannot lock {self.path.parent}"])

    def is_live(self) -> bool:
        """Whether another live process holds this folder's lock."""
        return self.path.exists() and not self._stale()

    def _stale(self) -> bool:
        try:
            pid = int(self.path.read_text().strip())
            os.kill(pid, 0)
        except PermissionError:
            return False  # alive, owned by another user
        except (ProcessLookupError, ValueError, OSError):
            return True  # the holder is gone, or the lock file is not ours to trust
        return False

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _run_key(method: str, config: MethodConfig, seed: int, splits: DatasetSplits) -> dict:
    return {
        "method": method,
        "config": config.to_dict(),
        "seed": seed,
        "dataset": splits.identity.fingerprint,
        "input_space": splits.input_space.to_dict(),
    }


def _save_checkpoint(out_dir: Path, ctx: RunContext, key: dict) -> None:
    state = {
        "iteration": ctx.iteration,
        "syn": ctx.syn.tensors(),
        "distiller": ctx.distiller.state_dict(),
        "history": ctx.history,
        "key": key,
    }
    atomic_write(out_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [f"{path}: checkpoint {old!r}, now {new!r}"]


def _load_checkpoint(out_dir: Path, key: dict, *, syn: SyntheticSet,
                     iterations: int) -> dict | None:
    """The checkpoint in `out_dir`, verified against this run; None when there is none."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    unreadable = (f"checkpoint {path} is unreadable or was not written by ddsuite; pass "
                  "--overwrite to start the run again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any damage: one short message, never torch's unsafe-load advice
        raise DDSuiteError(unreadable) from None
    if not isinstance(state, dict) or not {"key", "syn", "iteration"} <= set(state):
        raise DDSuiteError(unreadable)
    if state["key"] != key:
        changed = _differences(state["key"], key)
        raise ConfigError([
            f"the checkpoint in {out_dir} was made with other settings ("
            + "; ".join(changed[:6]) + "); resume with the same settings, or pass "
            "--overwrite to start again"
        ])
    expected = syn.tensors()
    for name, tensor in expected.items():
        saved = state["syn"].get(name)
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape:
            raise DDSuiteError(f"{unreadable} (tensor {name!r} is missing or has another shape)")
    if not isinstance(state.get("history", []), list) or not isinstance(
            state.get("distiller", {}), dict):
        raise DDSuiteError(f"{unreadable} (history or distiller state has the wrong type)")
    iteration = state["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) \
            or not 0 <= iteration <= iterations:
        raise DDSuiteError(f"{unreadable} (iteration {iteration!r} is outside 0..{iterations})")
    return state


def resolve_config(method: str, config: MethodConfig | dict[str, Any] | None, *,
                   dataset: str) -> MethodConfig:
    """Build the method's config from a dict (all problems at once) and fill its defaults."""
    cls = get_method(method)
    if config is None:
        config = cls.Config()
    elif isinstance(config, dict):
        config = config_from_dict(cls.Config, config, source=f"{method} config")
    elif not isinstance(config, cls.Config):
        raise ConfigError([f"{method} takes a {cls.Config.__name__}, got "
                           f"{type(config).__name__}"])
    return config.resolve(dataset=dataset)


def _write_status(out: Path, key: dict, protocol: EvaluationProtocol, iterations: int,
                  status: str, **extra: Any) -> None:
    write_json(out / RUN_FILE, {"key": key, "protocol": protocol.to_dict(),
                                "iterations": iterations, "status": status, **extra})


def _run_loop(distiller: Distiller, *, method: str, splits: DatasetSplits,
              device: torch.device, seed: int, out: Path | None, key: dict,
              protocol: EvaluationProtocol, callbacks: Sequence[Callback],
              checkpoint_every: int, resume: bool, start: float) -> RunContext:
    """Initialise or resume, iterate, call the callbacks; marks run.json on the way."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        syn = distiller.initialize(torch.Generator().manual_seed(seed))
        distiller.setup(syn)
        ctx = RunContext(method=method, distiller=distiller, syn=syn, splits=splits,
                         device=device, seed=seed, iterations=distiller.iterations,
                         out_dir=out)
        state = None
        if out is not None and resume:
            state = _load_checkpoint(out, key, syn=syn, iterations=ctx.iterations)
        if state is not None:
            syn.load_tensors({k: v.to(device) for k, v in state["syn"].items()})
            distiller.load_state_dict(state["distiller"])
            ctx.iteration = state["iteration"]
            ctx.history = list(state["history"])
            logger.info("resuming %s at iteration %d/%d", method, ctx.iteration, ctx.iterations)
        if out is not None:
            _write_status(out, key, protocol, ctx.iterations, "running")
        try:
            for callback in callbacks:
                callback.on_start(ctx)
            while ctx.iteration < ctx.iterations:
                iteration_seed = _iteration_seed(seed, ctx.iteration)
                torch.manual_seed(iteration_seed)
                generator = torch.Generator().manual_seed(iteration_seed)
                metrics = distiller.step(syn, iteration=ctx.iteration, generator=generator)
                bad = syn.non_finite()
                if bad:
                    raise NonFiniteError(", ".join(bad), ctx.iteration)
                ctx.iteration += 1
                for callback in callbacks:
                    callback.on_step(ctx, metrics)
                if (out is not None and checkpoint_every > 0
                        and ctx.iteration % checkpoint_every == 0):
                    _save_checkpoint(out, ctx, key)
            ctx.metrics["distill_seconds"] = time.perf_counter() - start
            if (out is not None and checkpoint_every > 0 and ctx.iterations > 0
                    and ctx.iteration % checkpoint_every):
                # The end callbacks (a final evaluation) can take long: an interruption
                # there resumes after the last iteration, not from the start.
                _save_checkpoint(out, ctx, key)
            for callback in callbacks:
                callback.on_end(ctx)
        except BaseException as exc:
            if out is not None:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                _write_status(out, key, protocol, ctx.iterations, status,
                              at_iteration=ctx.iteration, error=str(exc)[:500])
            raise
    return ctx


def distill(
    method: str,
    *,
    splits: DatasetSplits,
    config: MethodConfig | dict[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    out_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    protocol: EvaluationProtocol | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> DistillResult:
    """Distil `splits.train` with `method` and, with `out_dir`, write the run folder.

    Args:
        method: a registered method name (see `ddsuite.core.methods.list_methods`).
        splits: the dataset, already on `device`.
        config: the method's config object or a dict of its options; None: defaults.
        seed: the run's seed; every random draw derives from it.
        device: where to distil.
        out_dir: run folder for the artifact, `run.json` and checkpoints; None keeps
            everything in memory.
        callbacks: hooks called at start, after each iteration and at the end.
        checkpoint_every: iterations between checkpoints (0: none); needs `out_dir`.
        resume: continue from the checkpoint in `out_dir`.
        overwrite: replace an existing run folder.
        protocol: the evaluation protocol recorded with the set; default: the method's own.
        extra_meta: more provenance to store in the artifact's metadata.

    Raises:
        NonFiniteError: at the first non-finite loss, gradient or pixel; the last good
            checkpoint is kept and no artifact is written.
    """
    device = torch.device(device)
    config = resolve_config(method, config, dataset=splits.identity.name)
    distiller = get_method(method)(config, splits=splits, device=device)
    protocol = protocol or distiller.eval_protocol(config)
    protocol.check_models(image_shape=splits.train.image_shape,
                          num_classes=splits.train.num_classes)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        prepare_out_dir(out, resume=resume, overwrite=overwrite)
    key = _run_key(method, config, seed, splits)
    start = time.perf_counter()

    if out is not None and resume and is_artifact(out) and not (out / CHECKPOINT_FILE).exists():
        artifact = load_artifact(out, device=device)
        finished_key = artifact.meta.get("run_key")
        if finished_key != key:
            changed = sorted(k for k in set(finished_key or {}) | set(key)
                             if (finished_key or {}).get(k) != key.get(k))
            raise ConfigError([f"{out} holds a finished run with a different "
                               f"{', '.join(changed)}; pass --overwrite to replace it"])
        logger.info("%s already holds the finished run; nothing to resume", out)
        syn = artifact.synthetic_set()
        saved = EvaluationProtocol.from_dict(artifact.meta["protocol"])
        return DistillResult(syn=syn, config=config, protocol=saved, history=[],
                             metrics=artifact.meta.get("metrics", {}), seconds=0.0, out_dir=out)

    lock = RunLock(out) if out is not None else contextlib.nullcontext()
    with lock:
        ctx = _run_loop(distiller, method=method, splits=splits, device=device, seed=seed,
                        out=out, key=key, protocol=protocol, callbacks=callbacks,
                        checkpoint_every=checkpoint_every, resume=resume, start=start)
        seconds = ctx.metrics["distill_seconds"]
        syn = ctx.syn
        protocol = distiller.final_protocol(syn, protocol)
        meta = distiller.artifact_meta()
        if out is not None:
            save_artifact(
                out, syn.tensors(), method=method, config=config.to_dict(), seed=seed,
                dataset=splits.identity.to_dict(), input_space=splits.input_space.to_dict(),
                protocol=protocol.to_dict(), metrics=ctx.metrics, decode=syn.decode,
                extra={"family": distiller.family, "iterations": ctx.iterations,
                       "run_key": key, "history": ctx.history, **(extra_meta or {}),
                       **meta},
            )
            _write_status(out, key, protocol, ctx.iterations, "finished", seconds=seconds)
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return DistillResult(syn=syn, config=config, protocol=protocol, history=ctx.history,
                         metrics=ctx.metrics, seconds=seconds, out_dir=out, meta=meta)
