"""The "continual" scenario: replay-memory policies compared at one budget on one stream.

For every seed the harness cuts the dataset into a stream (class order or permutations from
the seed), and for every memory policy and protocol trains a fresh learner with an Avalanche
`Naive` strategy:

- protocol ``replay``: minibatches of the current experience mixed with the memory
  (Avalanche's `ReplayPlugin`); the memory absorbs the experience after training on it;
- protocol ``retrain``: the memory absorbs the experience, then the learner restarts from its
  initial weights and trains on the memory alone (GDumb-style; the protocol of the
  dataset-distillation papers).

Policies: ``reservoir`` (Avalanche's reservoir sampling over the stream), ``gdumb``
(Avalanche's class-balanced reservoir, GDumb's memory), and any registered ddsuite method by
name (``random`` is the class-balanced random memory; ``herding``, ``k-center``, ``dm``,
``dc``, ...), condensed by `CondensedBuffer`. Every policy gets the same budget: ``ipc``
images per class, ``ipc * classes`` images in all, and the bytes it actually stores are
reported beside it.

Metrics come from Avalanche's evaluation plugin after every experience: the accuracy matrix,
stream accuracy, forgetting and BWT. The report folder holds `summary.md`, `metrics.json`
(per seed and mean ± std, with provenance) and plots of the average accuracy after each
experience and of the accuracy matrices.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ddsuite.core.atomic import atomic_write, write_json, write_text
from ddsuite.core.data import load_dataset
from ddsuite.core.device import device_problems, resolve_device
from ddsuite.core.engine import prepare_out_dir, scenario_status
from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.core.evaluation import mean_std
from ddsuite.core.methods import config_from_dict, get_method, list_methods
from ddsuite.core.models import build_model
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import format_mean_std, markdown_table
from ddsuite.scenarios.compare import DatasetSpec
from ddsuite.scenarios.registry import (
    ScenarioKind,
    register_scenario_kind,
    scenario_name_problems,
)

from .benchmark import BENCHMARK_KINDS, ContinualBenchmark, make_benchmark

__all__ = ["AVALANCHE_POLICIES", "BenchmarkSpec", "ContinualScenario", "LearnerSpec",
           "PROTOCOLS", "run_continual", "run_stream"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("replay", "retrain")
# Memories condense experience k with seed * 1000 + k, which must fit torch's 64-bit seeds.
MAX_SEED = 2 ** 32
AVALANCHE_POLICIES = ("reservoir", "gdumb")
_ACC_KEY = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"


@dataclass(kw_only=True)
class BenchmarkSpec:
    """How the dataset becomes a stream."""

    kind: str = "split"
    n_experiences: int = 5

    def problems(self) -> list[str]:
        out = []
        if self.kind not in BENCHMARK_KINDS:
            out.append(f"kind: {self.kind!r} is not one of {', '.join(BENCHMARK_KINDS)}")
        if self.n_experiences < 1:
            out.append(f"n_experiences: must be >= 1, got {self.n_experiences}")
        return out


@dataclass(kw_only=True)
class LearnerSpec:
    """The continually trained network and its SGD settings."""

    model: str = "convnet(width=32)"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    batch_size_mem: int | None = None
    epochs: int = 1
    retrain_epochs: int = 50
    eval_batch_size: int = 1024

    def problems(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            out.append(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            out.append(f"weight_decay: must be >= 0, got {self.weight_decay}")
        for name in ("batch_size", "epochs", "retrain_epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size_mem is not None and self.batch_size_mem < 1:
            out.append(f"batch_size_mem: must be null or >= 1, got {self.batch_size_mem}")
        return out


@dataclass(kw_only=True)
class ContinualScenario:
    """Memory policies compared at one budget on a continual stream."""

    name: str
    kind: str = "continual"
    description: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    ipc: int = 10
    policies: list[Any] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    seeds: list[Any] = field(default_factory=lambda: [0])
    learner: LearnerSpec = field(default_factory=LearnerSpec)
    distill_model: str | None = "convnet(width=32)"
    device: str = "auto"

    def problems(self) -> list[str]:
        out = scenario_name_problems(self.name)
        if self.ipc < 1:
            out.append(f"ipc: the memory holds ipc images per class; must be >= 1, "
                       f"got {self.ipc}")
        allowed = ", ".join(AVALANCHE_POLICIES + tuple(list_methods()))
        if not self.policies:
            out.append(f"policies: name at least one policy; allowed: {allowed}")
        for i, entry in enumerate(self.policies):
            if not isinstance(entry, dict) or "name" not in entry:
                out.append(f"policies[{i}]: expected a mapping such as {{name: dm, "
                           f"iterations: 100}}, got {entry!r}")
                continue
            name = entry["name"]
            options = {k: v for k, v in entry.items() if k not in ("name", "label")}
            if name in AVALANCHE_POLICIES:
                if options:
                    out.append(f"policies[{i}]: {name} takes no options, got "
                               f"{', '.join(options)}")
                continue
            if name not in list_methods():
                out.append(f"policies[{i}].name: {name!r} is not a policy; allowed: {allowed}")
                continue
            if "ipc" in options:
                out.append(f"policies[{i}].ipc: set ipc at the top level of the scenario")
                continue
            try:
                config_from_dict(get_method(name).Config,
                                 self.method_options(name, options))
            except ConfigError as exc:
                out.extend(f"policies[{i}].{p}" for p in exc.problems)
        builtin = set(AVALANCHE_POLICIES) | set(list_methods())
        for i, entry in enumerate(self.policies):
            if not isinstance(entry, dict) or "label" not in entry:
                continue
            label = entry["label"]
            if not isinstance(label, str) or not label.strip() or "|" in label:
                out.append(f"policies[{i}].label: expected a non-empty name without '|', "
                           f"got {label!r}")
            elif label in builtin and label != entry.get("name"):
                out.append(f"policies[{i}].label: {label!r} is the name of another policy; "
                           "choose a label no policy or method has")
        labels = [policy_label(e) for e in self.policies if isinstance(e, dict) and "name" in e]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            out.append(f"policies: {', '.join(map(str, repeated))} appear(s) more than once; give "
                       "each entry a distinct label, e.g. {name: dm, label: dm-2000, "
                       "iterations: 2000}")
        for key in ("protocols", "seeds"):
            values = [v for v in getattr(self, key) if isinstance(v, (int, str))]
            if len(set(values)) != len(values):
                out.append(f"{key}: each value may appear once, got {getattr(self, key)!r}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if not self.protocols or bad:
            out.append(f"protocols: expected a non-empty list of {', '.join(PROTOCOLS)}, "
                       f"got {self.protocols!r}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int)
                                 or not 0 <= s < MAX_SEED for s in self.seeds):
            out.append(f"seeds: expected a non-empty list of integers in 0..{MAX_SEED - 1}, "
                       f"got {self.seeds!r}")
        if self.benchmark.kind == "permuted" and self.ipc % max(1, self.benchmark.n_experiences):
            out.append(f"ipc: a permuted stream shares each class's {self.ipc} images equally "
                       f"among {self.benchmark.n_experiences} experiences; ipc must be a "
                       "multiple of n_experiences so every policy gets the same budget")
        out.extend(device_problems(self.device))
        return out

    def method_options(self, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """The policy's options, with `distill_model` where the method has a model."""
        fields = get_method(name).Config.__dataclass_fields__
        if self.distill_model and "model" in fields and "model" not in options:
            return {**options, "model": self.distill_model}
        return dict(options)


def policy_label(entry: dict[str, Any]) -> str:
    """The name a policy entry is reported under: its `label`, else its method name."""
    return str(entry.get("label", entry["name"]))


def _memory(scenario: ContinualScenario, entry: dict[str, Any], bench: ContinualBenchmark,
            *, seed: int, device: torch.device, cache):
    """The storage policy of one policy entry."""
    from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer

    from .memory import CondensedBuffer

    name = entry["name"]
    groups = bench.num_classes * (bench.n_experiences if bench.kind == "permuted" else 1)
    max_size = scenario.ipc * bench.num_classes
    if name in AVALANCHE_POLICIES:
        stock = ReservoirSamplingBuffer if name == "reservoir" else ClassBalancedBuffer

        class Stock(stock):
            """Avalanche's buffer; `update` without the deprecation warning it emits."""

            def update(self, strategy, **kwargs):
                self.post_adapt(strategy, strategy.experience)

        return Stock(max_size) if name == "reservoir" else Stock(max_size, adaptive_size=True)
    options = scenario.method_options(
        name, {k: v for k, v in entry.items() if k not in ("name", "label")})
    return CondensedBuffer(
        max_size, method=name, method_config=options, total_num_groups=groups, seed=seed,
        device=device, input_space=bench.splits.input_space,
        dataset_name=bench.splits.identity.name, cache=cache)


def _memory_size(storage, image_bytes: int) -> tuple[int, int]:
    """(images, bytes) a storage policy holds."""
    if hasattr(storage, "memory_bytes"):
        return len(storage), storage.memory_bytes
    n = len(storage.buffer)
    return n, n * (image_bytes + 8)


def run_stream(bench: ContinualBenchmark, storage, *, protocol: str, learner: LearnerSpec,
               seed: int, device: torch.device) -> dict[str, Any]:
    """Train one learner through the stream with `storage` under `protocol`.

    Returns the accuracy matrix (row i: accuracy on every test experience after training on
    experience i), the final average accuracy, Avalanche's stream accuracy, forgetting and
    BWT, the time spent condensing and training, and the memory's size.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.supervised import Naive

    from .plugins import RetrainOnMemoryPlugin

    if protocol not in PROTOCOLS:
        raise ConfigError([f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}"])
    torch.manual_seed(seed)
    c, h, w = bench.image_shape
    model = build_model(learner.model, in_channels=c, num_classes=bench.num_classes,
                        image_size=(h, w), device=device)
    if protocol == "replay":
        plugin = ReplayPlugin(mem_size=storage.max_size, storage_policy=storage,
                              batch_size_mem=learner.batch_size_mem)
        epochs = learner.epochs
    else:
        plugin = RetrainOnMemoryPlugin(storage)
        epochs = learner.retrain_epochs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "No loggers specified", UserWarning)
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True), loggers=[])
    optimizer = torch.optim.SGD(model.parameters(), lr=learner.lr, momentum=learner.momentum,
                                weight_decay=learner.weight_decay)
    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=learner.batch_size,
                     train_epochs=epochs, eval_mb_size=learner.eval_batch_size, device=device,
                     evaluator=evaluator, plugins=[plugin])
    n = bench.n_experiences
    matrix: list[list[float]] = []
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for exp in bench.benchmark.train_stream:
        strategy.train(exp, num_workers=0)
        results = strategy.eval(bench.benchmark.test_stream, num_workers=0)
        matrix.append([float(results[_ACC_KEY.format(j)]) for j in range(n)])
        if not all(torch.isfinite(torch.tensor(matrix[-1]))):
            raise DDSuiteError(f"non-finite accuracy after experience {len(matrix) - 1}")
    seconds = time.perf_counter() - start
    condense = float(sum(getattr(storage, "condense_seconds", [])))
    spent_updating = float(getattr(storage, "update_seconds", 0.0))
    images, nbytes = _memory_size(storage, c * h * w * 4)
    return {
        "accuracy_matrix": matrix,
        "final_average_accuracy": sum(matrix[-1]) / n,
        "stream_accuracy": float(results["Top1_Acc_Stream/eval_phase/test_stream/Task000"]),
        "forgetting": float(results["StreamForgetting/eval_phase/test_stream"]),
        "bwt": float(results["StreamBWT/eval_phase/test_stream"]),
        "condense_seconds": condense,
        "train_seconds": seconds - spent_updating,
        "memory_images": images,
        "memory_bytes": nbytes,
    }


def _average_after_each(matrix: list[list[float]]) -> list[float]:
    """Average accuracy over the experiences seen so far, after each experience."""
    return [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def run_continual(scenario: ContinualScenario, *, out_dir: Path, device: str | None = None,
                  resolved: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Run every policy under every protocol and seed; write the report; return its summary."""
    try:
        import avalanche  # noqa: F401
    except ImportError:
        raise ConfigError(["the continual scenarios need Avalanche: pip install "
                           "'ddsuite[continual]' (avalanche-lib 0.6.0)"]) from None
    device_ = resolve_device(device or scenario.device)
    spec = scenario.dataset
    splits = load_dataset(spec.name, data_root=spec.data_root, device="cpu", zca=spec.zca,
                          download=spec.download)
    # Everything checkable is checked before the report folder exists.
    _precheck(scenario, splits, device_)
    prepare_out_dir(out_dir, resume=False, overwrite=overwrite, can_resume=False)
    with scenario_status(out_dir, scenario.name):
        write_text(out_dir / "scenario.yaml",
                   yaml.safe_dump(resolved or asdict(scenario), sort_keys=False))
        return _run_all(scenario, splits, out_dir, device_)


def _buildable(spec: str, what: str, splits) -> None:
    """Build `spec` for the dataset on the CPU; a spec that cannot be built is a ConfigError."""
    c, h, w = splits.train.image_shape
    try:
        build_model(spec, in_channels=c, num_classes=splits.train.num_classes,
                    image_size=(h, w), device="cpu")
    except DDSuiteError as exc:
        raise ConfigError([f"{what}: {exc}"]) from None
    except (RuntimeError, MemoryError) as exc:
        raise ConfigError([f"{what}: {spec!r} cannot be built ({exc})"]) from None


def _precheck(scenario: ContinualScenario, splits, device: torch.device) -> None:
    """Build the learner, the stream and every memory's distiller on the first experience."""
    from .memory import experience_tensors

    _buildable(scenario.learner.model, "learner.model", splits)
    if scenario.distill_model:
        _buildable(scenario.distill_model, "distill_model", splits)
    splits.train.check_ipc(scenario.ipc)
    bench = make_benchmark(splits, kind=scenario.benchmark.kind,
                           n_experiences=scenario.benchmark.n_experiences, seed=scenario.seeds[0])
    first = bench.benchmark.train_stream[0]
    images, labels, _ = experience_tensors(first.dataset)
    for entry in scenario.policies:
        storage = _memory(scenario, entry, bench, seed=scenario.seeds[0], device=device,
                          cache=None)
        if hasattr(storage, "check_experience"):
            try:
                storage.check_experience(images, labels)
            except (RuntimeError, MemoryError) as exc:
                raise ConfigError([f"policy {policy_label(entry)!r} cannot condense the first "
                                   f"experience: {exc}"]) from None


def _run_all(scenario: ContinualScenario, splits, out_dir: Path, device_: torch.device) -> str:
    from .memory import CondensationCache

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    benchmarks = []
    for seed in scenario.seeds:
        bench = make_benchmark(splits, kind=scenario.benchmark.kind,
                               n_experiences=scenario.benchmark.n_experiences, seed=seed)
        benchmarks.append(bench.to_dict())
        cache = CondensationCache()
        for entry in scenario.policies:
            for protocol in scenario.protocols:
                storage = _memory(scenario, entry, bench, seed=seed, device=device_,
                                  cache=cache)
                run = run_stream(bench, storage, protocol=protocol, learner=scenario.learner,
                                 seed=seed, device=device_)
                run["seed"] = seed
                runs.setdefault(policy_label(entry), {}).setdefault(protocol, []).append(run)
                print(f"seed {seed} {policy_label(entry):>10} {protocol:>7}: final average "
                      f"accuracy {100 * run['final_average_accuracy']:.1f}%, forgetting "
                      f"{100 * run['forgetting']:.1f}%, condensing {run['condense_seconds']:.0f}"
                      f" s, training {run['train_seconds']:.0f} s", flush=True)

    results = _aggregate(runs)
    summary = _summary(scenario, splits, results)
    metrics = {
        "scenario": scenario.name,
        "created": timestamp(),
        "dataset": splits.identity.to_dict(),
        "input_space": splits.input_space.to_dict(),
        "benchmarks": benchmarks,
        "budget": {"ipc": scenario.ipc,
                   "images": scenario.ipc * splits.train.num_classes},
        "learner": asdict(scenario.learner),
        "device": str(device_),
        "versions": library_versions(("avalanche-lib",)),
        "results": results,
    }
    _plots(out_dir / "plots", results, scenario)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "summary.md", summary)
    logger.info("wrote %s", out_dir)
    return summary


def _aggregate(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for policy, by_protocol in runs.items():
        for protocol, seed_runs in by_protocol.items():
            n = len(seed_runs[0]["accuracy_matrix"])
            mean_matrix = [[sum(r["accuracy_matrix"][i][j] for r in seed_runs) / len(seed_runs)
                            for j in range(n)] for i in range(n)]
            entry = {"runs": seed_runs, "mean_accuracy_matrix": mean_matrix}
            for key in ("final_average_accuracy", "stream_accuracy", "forgetting", "bwt",
                        "condense_seconds", "train_seconds", "memory_images", "memory_bytes"):
                mean, std = mean_std([float(r[key]) for r in seed_runs])
                entry[key] = {"mean": mean, "std": std, "n": len(seed_runs)}
            entry["average_after_each"] = _average_after_each(mean_matrix)
            out.setdefault(policy, {})[protocol] = entry
    return out


def _summary(scenario: ContinualScenario, splits, results: dict[str, Any]) -> str:
    rows = []
    for protocol in scenario.protocols:
        for policy, by_protocol in results.items():
            r = by_protocol[protocol]

            def pct(key: str) -> str:
                return format_mean_std(100 * r[key]["mean"], 100 * r[key]["std"],
                                       n=r[key]["n"])

            rows.append([protocol, policy, pct("final_average_accuracy"), pct("forgetting"),
                         pct("bwt"), f"{r['memory_images']['mean']:.0f}",
                         f"{r['memory_bytes']['mean'] / 1024:.1f}",
                         f"{r['condense_seconds']['mean']:.1f}"])
    table = markdown_table(["protocol", "policy", "final avg acc (%)", "forgetting (%)",
                            "BWT (%)", "memory images", "memory KiB", "condense s"], rows)
    learner = scenario.learner
    schedule = [f"replay: {learner.epochs} epoch(s) per experience"
                if p == "replay" else f"retrain: {learner.retrain_epochs} epochs on the memory"
                for p in scenario.protocols]
    return (
        f"# {scenario.name}\n\n{scenario.description.strip()}\n\n"
        f"{scenario.benchmark.kind} {splits.identity.name}, "
        f"{scenario.benchmark.n_experiences} experiences, memory {scenario.ipc} images per "
        f"class ({scenario.ipc * splits.train.num_classes} images), learner {learner.model} "
        f"({'; '.join(schedule)}), mean ± std over seeds {scenario.seeds}. Metrics from "
        f"Avalanche's evaluation plugin after the last experience.\n\n{table}\n"
    )


def _plots(folder: Path, results: dict[str, Any], scenario: ContinualScenario) -> None:
    """Average accuracy after each experience, and the mean accuracy matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    protocols = scenario.protocols
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for policy, by_protocol in results.items():
            curve = by_protocol[protocol]["average_after_each"]
            ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o",
                    label=policy)
        ax.set_title(f"protocol: {protocol}")
        ax.set_xticks(range(1, scenario.benchmark.n_experiences + 1))
        ax.set_xlabel("experiences seen")
        ax.set_ylabel("average accuracy on seen experiences (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(folder / "accuracy_per_experience.png",
                 lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)

    policies = list(results)
    fig, axes = plt.subplots(len(protocols), len(policies),
                             figsize=(2.6 * len(policies), 2.6 * len(protocols)), squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, policy in enumerate(policies):
            ax = axes[i][j]
            matrix = results[policy][protocol]["mean_accuracy_matrix"]
            ax.imshow([[100 * v for v in row] for row in matrix], vmin=0, vmax=100,
                      cmap="viridis")
            for r, row in enumerate(matrix):
                for col, v in enumerate(row):
                    ax.text(col, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")
            ax.set_title(f"{policy} / {protocol}", fontsize=8)
            ax.set_xlabel("test experience", fontsize=7)
            ax.set_ylabel("after training on", fontsize=7)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    atomic_write(folder / "accuracy_matrix.png",
                 lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


register_scenario_kind(ScenarioKind(
    name="continual", schema=ContinualScenario, run=run_continual,
    summary="replay-memory policies (reservoir, coresets, distilled) on a continual stream"))
