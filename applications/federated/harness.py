"""The "federated" scenario: distilled uploads against model averaging, accuracy vs bytes.

For every Dirichlet alpha (or the one IID / shards split) and seed, the harness partitions
the training split among `num_clients` clients and runs every method of the scenario:
one-shot and multi-round distilled uploads, FedAvg, FedProx and the centralised bound. After
every round it scores the global model on the test split and counts the bytes that went up
(payloads, model updates, raw data) and down (broadcast models), exactly, from the tensors.

Methods run in process, or on Flower's Ray-backed simulation (``engine: flower``); both call
the same client and server functions. The report folder holds `summary.md`, `metrics.json`
(per round, per seed, with provenance) and plots of accuracy against bytes and rounds and of
the clients' class histograms.
"""

from __future__ import annotations

import dataclasses
import logging
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
from ddsuite.core.models import build_model
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import format_mean_std, markdown_table
from ddsuite.core.typed_config import from_dict
from ddsuite.scenarios.compare import DatasetSpec
from ddsuite.scenarios.registry import (
    ScenarioKind,
    register_scenario_kind,
    scenario_name_problems,
)

from .client import ClientData, client_data
from .partition import PARTITION_SCHEMES, Partition, partition_labels, partition_problems
from .server import FederationHistory, InProcessExchange, run_federation
from .spec import FederatedMethod

__all__ = ["ENGINES", "FederatedScenario", "PartitionSpec", "ShardLoader", "run_federated",
           "run_method"]

logger = logging.getLogger(__name__)

ENGINES = ("inprocess", "flower")
MAX_SEED = 2**32


@dataclass(kw_only=True)
class PartitionSpec:
    """How the training split is shared among the clients."""

    scheme: str = "dirichlet"
    alphas: list[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])
    shards_per_client: int = 2
    min_size: int = 10

    def problems(self) -> list[str]:
        out = []
        if self.scheme not in PARTITION_SCHEMES:
            out.append(f"scheme: {self.scheme!r} is not one of {', '.join(PARTITION_SCHEMES)}")
        if self.scheme == "dirichlet":
            if not self.alphas:
                out.append("alphas: name at least one Dirichlet alpha, e.g. [0.1, 0.5, 1.0]")
            bad = [a for a in self.alphas if not a > 0]
            if bad:
                out.append(f"alphas: the Dirichlet concentration must be > 0 (0.1: strong "
                           f"label skew, 100: nearly IID), got {bad}")
            if len(set(self.alphas)) != len(self.alphas):
                out.append(f"alphas: each value may appear once, got {self.alphas}")
        if self.min_size < 1:
            out.append(f"min_size: every client needs data; must be >= 1, got {self.min_size}")
        if self.shards_per_client < 1:
            out.append(f"shards_per_client: must be >= 1, got {self.shards_per_client}")
        return out

    def settings(self) -> list[float | None]:
        """The alphas to run (one None for IID and shards)."""
        return list(self.alphas) if self.scheme == "dirichlet" else [None]


@dataclass(kw_only=True)
class FederatedScenario:
    """Distilled uploads, FedAvg, FedProx and the centralised bound on one federation."""

    name: str
    kind: str = "federated"
    description: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    num_clients: int = 10
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    model: str = "convnet(width=32)"
    # Typed loosely here and built entry by entry, so one malformed entry does not hide the
    # problems of the others (nor empty the list).
    methods: list[Any] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    engine: str = "inprocess"
    device: str = "auto"

    def __post_init__(self) -> None:
        self._method_problems: list[str] = []
        built = []
        for i, entry in enumerate(self.methods):
            if isinstance(entry, FederatedMethod):
                built.append(entry)
                continue
            try:
                built.append(from_dict(FederatedMethod, entry))
            except ConfigError as exc:
                self._method_problems += [f"methods[{i}].{p}".replace(".config: ", ": ")
                                          for p in exc.problems]
        if not self._method_problems:
            self.methods = built

    def problems(self) -> list[str]:
        out = scenario_name_problems(self.name)
        if self.num_clients < 1:
            out.append(f"num_clients: must be >= 1, got {self.num_clients}")
        if not self.methods:
            out.append("methods: name at least one method, e.g. {kind: oneshot}")
        out.extend(self._method_problems)
        names = [m.name for m in self.methods if isinstance(m, FederatedMethod)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            out.append(f"methods: {', '.join(repeated)} appear(s) more than once; give each "
                       "entry a distinct label, e.g. {kind: fedavg, label: fedavg-50, "
                       "rounds: 50}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                not 0 <= s < MAX_SEED for s in self.seeds):
            out.append(f"seeds: expected a non-empty list of distinct integers in "
                       f"0..{MAX_SEED - 1}, got {self.seeds!r}")
        if self.engine not in ENGINES:
            out.append(f"engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        out.extend(device_problems(self.device))
        return out


class ShardLoader:
    """Partition id -> that client's `ClientData`, loading the dataset once per process.

    Picklable (it holds only settings), so Flower's Ray workers can build their own shard.
    """

    _cache: dict[tuple, tuple[Any, Partition]] = {}

    def __init__(self, dataset: DatasetSpec, *, num_clients: int, partition: PartitionSpec,
                 alpha: float | None, seed: int):
        if dataset.data_root is not None:  # Ray's workers may start in another folder
            dataset = dataclasses.replace(dataset, data_root=str(Path(dataset.data_root)
                                                                 .resolve()))
        self.dataset, self.num_clients, self.partition = dataset, num_clients, partition
        self.alpha, self.seed = alpha, seed

    def _key(self) -> tuple:
        d, p = self.dataset, self.partition
        return (d.name, d.data_root, d.zca, self.num_clients, p.scheme, self.alpha,
                p.shards_per_client, p.min_size, self.seed)

    def load(self, splits=None) -> tuple[Any, Partition]:
        """The dataset and its partition (`splits`: the dataset, already loaded)."""
        key = self._key()
        if key not in self._cache:
            d, p = self.dataset, self.partition
            if splits is None:
                splits = load_dataset(d.name, data_root=d.data_root, device="cpu", zca=d.zca,
                                      download=d.download)
            part = partition_labels(splits.train.labels, num_clients=self.num_clients,
                                    scheme=p.scheme, alpha=self.alpha,
                                    shards_per_client=p.shards_per_client,
                                    min_size=p.min_size, seed=self.seed)
            self._cache.clear()  # one federation per process at a time
            self._cache[key] = (splits, part)
        return self._cache[key]

    def __call__(self, client: int) -> ClientData:
        splits, part = self.load()
        return client_data(splits, part.indices[client], client=client)


def run_method(method: FederatedMethod, loader: ShardLoader, *, model: str, seed: int,
               device: torch.device, engine: str) -> FederationHistory:
    """One method on one federation, in process or on Flower's simulation engine."""
    splits, _ = loader.load()
    if engine == "flower":
        from .flower import run_on_flower

        return run_on_flower(method, splits=splits, load_client=loader,
                             num_clients=loader.num_clients, model=model, seed=seed,
                             device=device)
    clients = [loader(k) for k in range(loader.num_clients)]
    exchange = InProcessExchange(method, clients, model=model, seed=seed, device=device)
    return run_federation(method, exchange=exchange, splits=splits, model=model, seed=seed,
                          device=device, num_clients=loader.num_clients)


def run_federated(scenario: FederatedScenario, *, out_dir: Path, device: str | None = None,
                  resolved: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Run every method for every alpha and seed; write the report; return its summary."""
    if scenario.engine == "flower":
        try:
            import flwr  # noqa: F401
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError(["engine flower needs Flower's simulation engine: pip install "
                               "'ddsuite[federated]' (flwr[simulation])"]) from None
    device_ = resolve_device(device or scenario.device)
    spec = scenario.dataset
    splits = load_dataset(spec.name, data_root=spec.data_root, device="cpu", zca=spec.zca,
                          download=spec.download)
    # Everything checkable is checked before the report folder exists.
    _precheck(scenario, splits)
    prepare_out_dir(out_dir, resume=False, overwrite=overwrite, can_resume=False)
    with scenario_status(out_dir, scenario.name):
        write_text(out_dir / "scenario.yaml",
                   yaml.safe_dump(resolved or asdict(scenario), sort_keys=False))
        return _run_all(scenario, splits, out_dir, device_)


def _precheck(scenario: FederatedScenario, splits) -> None:
    problems = []
    c, h, w = splits.train.image_shape
    try:
        build_model(scenario.model, in_channels=c, num_classes=splits.train.num_classes,
                    image_size=(h, w), device="cpu")
    except (DDSuiteError, RuntimeError) as exc:
        problems.append(f"model: {scenario.model!r} cannot be built for "
                        f"{splits.identity.name} ({exc})")
    p = scenario.partition
    problems += partition_problems(
        num_samples=len(splits.train), num_clients=scenario.num_clients, scheme=p.scheme,
        alpha=p.settings()[0] if p.scheme == "dirichlet" else None,
        shards_per_client=p.shards_per_client, min_size=p.min_size)
    if problems:
        raise ConfigError(problems)
    for alpha in p.settings():  # a draw that cannot satisfy min_size fails here, not later
        for seed in scenario.seeds:
            partition_labels(splits.train.labels, num_clients=scenario.num_clients,
                             scheme=p.scheme, alpha=alpha,
                             shards_per_client=p.shards_per_client, min_size=p.min_size,
                             seed=seed)


def _setting_name(alpha: float | None, scheme: str) -> str:
    return f"alpha={alpha:g}" if alpha is not None else scheme


def _run_all(scenario: FederatedScenario, splits, out_dir: Path, device_: torch.device) -> str:
    p = scenario.partition
    results: dict[str, dict[str, Any]] = {}
    partitions: dict[str, list[dict[str, Any]]] = {}
    for alpha in p.settings():
        setting = _setting_name(alpha, p.scheme)
        for seed in scenario.seeds:
            loader = ShardLoader(scenario.dataset, num_clients=scenario.num_clients,
                                 partition=p, alpha=alpha, seed=seed)
            partitions.setdefault(setting, []).append(loader.load(splits)[1].to_dict())
            for method in scenario.methods:
                history = run_method(method, loader, model=scenario.model, seed=seed,
                                     device=device_, engine=scenario.engine)
                run = history.to_dict()
                run["seed"] = seed
                results.setdefault(setting, {}).setdefault(method.name, {"runs": []})
                results[setting][method.name]["runs"].append(run)
                print(f"{setting} seed {seed} {method.name:>12}: accuracy "
                      f"{100 * history.final_accuracy:.2f}% after {len(history.rounds)} "
                      f"round(s), {history.total_bytes / 2**20:.3f} MiB sent", flush=True)
    _aggregate(results)
    summary = _summary(scenario, splits, results)
    metrics = {
        "scenario": scenario.name,
        "created": timestamp(),
        "dataset": splits.identity.to_dict(),
        "input_space": splits.input_space.to_dict(),
        "num_clients": scenario.num_clients,
        "partitions": partitions,
        "model": scenario.model,
        "methods": [asdict(m) for m in scenario.methods],
        "engine": scenario.engine,
        "device": str(device_),
        "bytes": "exact: numel * element_size of every tensor sent, up and down",
        "versions": library_versions(("flwr", "ray")),
        "results": results,
    }
    _plots(out_dir / "plots", results, partitions)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "summary.md", summary)
    logger.info("wrote %s", out_dir)
    return summary


def _aggregate(results: dict[str, dict[str, Any]]) -> None:
    """Mean and std over seeds of the final accuracy and bytes; mean curves per round."""
    for by_method in results.values():
        for entry in by_method.values():
            runs = entry["runs"]
            for key in ("final_accuracy", "bytes_up", "bytes_down", "total_bytes"):
                mean, std = mean_std([float(r[key]) for r in runs])
                entry[key] = {"mean": mean, "std": std, "n": len(runs)}
            n = len(runs[0]["rounds"])
            entry["accuracy_per_round"] = [
                sum(r["rounds"][i]["accuracy"] for r in runs) / len(runs) for i in range(n)]
            entry["cumulative_bytes"] = [
                sum(sum(x["bytes_up"] + x["bytes_down"] for x in r["rounds"][:i + 1])
                    for r in runs) / len(runs) for i in range(n)]


def _kind(scenario: FederatedScenario, name: str) -> str:
    return next(m.kind for m in scenario.methods if m.name == name)


def _comparison(scenario: FederatedScenario, by_method: dict[str, Any]) -> str:
    """How the one-shot upload compares with FedAvg: accuracy share and bytes share, and the
    bytes FedAvg needed to first reach the one-shot accuracy."""
    oneshot = [n for n in by_method if _kind(scenario, n) == "oneshot"]
    fedavg = [n for n in by_method if _kind(scenario, n) == "fedavg"]
    central = [n for n in by_method if _kind(scenario, n) == "centralised"]
    lines = []
    for o in oneshot:
        a_o = by_method[o]["final_accuracy"]["mean"]
        b_o = by_method[o]["total_bytes"]["mean"]
        if b_o == 0:
            lines.append(f"{o} uploaded nothing: every client skipped every class (each has "
                         f"fewer images than ipc), so the global model stayed untrained and "
                         f"there is no comparison to make; lower ipc.")
            continue
        for f in fedavg:
            a_f = by_method[f]["final_accuracy"]["mean"]
            b_f = by_method[f]["total_bytes"]["mean"]
            line = (f"{o} reaches {100 * a_o / a_f:.1f}% of {f}'s accuracy "
                    f"({100 * a_o:.2f}% vs {100 * a_f:.2f}%) with {100 * b_o / b_f:.2f}% of "
                    f"its bytes")
            curve, spent = by_method[f]["accuracy_per_round"], by_method[f]["cumulative_bytes"]
            reach = next((i for i, a in enumerate(curve) if a >= a_o), None)
            if reach is None:
                line += f"; {f} never reached {100 * a_o:.2f}% in {len(curve)} rounds"
            else:
                line += (f"; {f} first reached that accuracy after round {reach + 1} "
                         f"({spent[reach] / max(b_o, 1):.1f}x the one-shot bytes)")
            lines.append(line + ".")
        for c in central:
            a_c = by_method[c]["final_accuracy"]["mean"]
            lines.append(f"{o} keeps {100 * a_o / a_c:.1f}% of the centralised accuracy.")
    return "\n".join(f"- {line}" for line in lines)


def _summary(scenario: FederatedScenario, splits, results: dict[str, Any]) -> str:
    rows = []
    for setting, by_method in results.items():
        for name, r in by_method.items():
            rows.append([setting, name, len(r["accuracy_per_round"]),
                         format_mean_std(100 * r["final_accuracy"]["mean"],
                                         100 * r["final_accuracy"]["std"], digits=2,
                                         n=r["final_accuracy"]["n"]),
                         f"{r['bytes_up']['mean'] / 2**20:.3f}",
                         f"{r['bytes_down']['mean'] / 2**20:.3f}",
                         f"{r['total_bytes']['mean'] / 2**20:.3f}"])
    table = markdown_table(["partition", "method", "rounds", "test accuracy (%)",
                            "MiB up", "MiB down", "MiB total"], rows)
    notes = []
    for setting, by_method in results.items():
        text = _comparison(scenario, by_method)
        if text:
            notes.append(f"{setting}:\n{text}")
    methods = "; ".join(_describe(m) for m in scenario.methods)
    return (
        f"# {scenario.name}\n\n{scenario.description.strip()}\n\n"
        f"{splits.identity.name}, {scenario.num_clients} clients, {scenario.partition.scheme} "
        f"partition, global model {scenario.model}, engine {scenario.engine}; mean ± std over "
        f"seeds {scenario.seeds}. Bytes are exact tensor sizes (numel x element size), up "
        f"and down, summed over rounds and clients.\n\nMethods: {methods}.\n\n{table}\n"
        + ("\n" + "\n\n".join(notes) + "\n" if notes else "")
    )


def _describe(m: FederatedMethod) -> str:
    if m.distils:
        iters = m.distill.get("iterations", "default")
        text = f"{m.name}: {m.distiller} ipc {m.ipc} ({iters} iterations)"
        if m.kind == "multiround":
            text += f", {m.rounds} rounds, model noise {m.model_noise:g}"
        return text + f", server {m.server.epochs} epochs"
    if m.averages:
        text = f"{m.name}: {m.rounds} rounds of {m.local.epochs} local epoch(s)"
        return text + (f", mu {m.mu:g}" if m.kind == "fedprox" else "")
    return f"{m.name}: raw shards uploaded, server {m.server.epochs} epochs"


def _plots(folder: Path, results: dict[str, Any], partitions: dict[str, list]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    settings = list(results)
    for name, xlabel in (("accuracy_vs_bytes", "total MiB sent (up + down), log scale"),
                         ("accuracy_vs_rounds", "round")):
        fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4),
                                 squeeze=False)
        for ax, setting in zip(axes[0], settings):
            for method, r in results[setting].items():
                acc = [100 * a for a in r["accuracy_per_round"]]
                if name == "accuracy_vs_bytes":
                    x = [b / 2**20 for b in r["cumulative_bytes"]]
                    ax.set_xscale("log")
                else:
                    x = list(range(1, len(acc) + 1))
                ax.plot(x, acc, marker="o", markersize=3, label=method)
            ax.set_title(setting)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("global test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(folder / f"{name}.png", lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)

    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        hist = torch.tensor(partitions[setting][0]["histograms"])  # (clients, classes)
        bottom = torch.zeros(hist.shape[0])
        cmap = plt.get_cmap("tab10" if hist.shape[1] <= 10 else "tab20")
        for c in range(hist.shape[1]):
            ax.bar(range(hist.shape[0]), hist[:, c], bottom=bottom, color=cmap(c % cmap.N),
                   label=str(c), width=0.8)
            bottom += hist[:, c]
        ax.set_title(f"{setting} (seed {partitions[setting][0]['seed']})")
        ax.set_xlabel("client")
        ax.set_ylabel("samples per class")
        if hist.shape[1] <= 20:
            ax.legend(fontsize=6, ncol=2, title="class", title_fontsize=6)
    fig.tight_layout()
    atomic_write(folder / "client_histograms.png",
                 lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


register_scenario_kind(ScenarioKind(
    name="federated", schema=FederatedScenario, run=run_federated,
    summary="federated learning: distilled uploads vs FedAvg/FedProx, accuracy vs bytes"))
