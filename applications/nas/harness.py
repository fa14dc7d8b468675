"""The "nas-proxy" scenario: how far can each proxy's ranking of architectures be trusted?

For a set of ConvNet candidates (the 720-network space, a seeded sample of it, or a list):

1. a validation split is held out from the real training images (seeded, per class);
2. proxies are made from the rest (any ddsuite method, ``full``) or loaded from artifacts;
3. ground truth: every candidate trains on the real training split under the stated budget,
   then is tested on the real test split (cached on disk, computed once);
4. each proxy: the search strategy runs over the space in NNI's in-process sequential engine
   with the proxy evaluator, then every remaining candidate is scored too (a grid, sharing the
   memo) so the ranking covers all candidates;
5. the real-data search runs the same strategy on the ground truth's validation scores, so
   its time is what searching on the real data costs.

Reported per proxy: Spearman's rho and Kendall's tau-b between proxy validation accuracy and
real test accuracy over all ranked candidates, Spearman's rho over the top-5/10/20 real
candidates, the real test accuracy of the candidate the search picks, search time and
speed-up over the real-data search. Failed candidates (diverged) are counted, never ranked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ddsuite.core.atomic import atomic_write, write_json, write_text
from ddsuite.core.data import load_dataset
from ddsuite.core.device import device_problems, resolve_device
from ddsuite.core.engine import prepare_out_dir, scenario_status
from ddsuite.core.errors import ConfigError
from ddsuite.core.evaluation import EvaluationProtocol
from ddsuite.core.methods import config_from_dict, get_method, list_methods
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import markdown_table
from ddsuite.scenarios.compare import DatasetSpec
from ddsuite.scenarios.registry import (
    ScenarioKind,
    register_scenario_kind,
    scenario_name_problems,
)

from .candidates import ConvNetDims, check_candidates_fit, parse_candidate
from .ground_truth import GroundTruthCache, measure_ground_truth
from .proxy import ProxySet, TrainingBudget, hold_out, load_proxy, make_proxy
from .ranking import kendall, spearman, top_k_spearman

__all__ = ["GroundTruthSpec", "NasProxyScenario", "SearchSpec", "SpaceSpec", "run_nas_proxy"]

logger = logging.getLogger(__name__)

TOP_K = (5, 10, 20)
_STRATEGIES = ("grid", "random", "evolution")


@dataclass(kw_only=True)
class SpaceSpec:
    """The candidates: the product of the choices, a seeded sample of it, or a list."""

    depths: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    norms: list[str] = field(default_factory=lambda: ["none", "batch", "layer", "instance",
                                                      "group"])
    acts: list[str] = field(default_factory=lambda: ["sigmoid", "relu", "leakyrelu"])
    pools: list[str] = field(default_factory=lambda: ["none", "max", "avg"])
    sample: int | None = None
    """Draw this many distinct candidates (seeded by `seed`); null: every combination."""
    candidates: list[str] = field(default_factory=list)
    """Explicit candidate specs (inside the choices) instead of a sample."""
    seed: int = 0

    def problems(self) -> list[str]:
        try:
            dims = self.dims()
        except ConfigError as exc:
            return list(exc.problems)
        out = []
        if self.sample is not None and self.candidates:
            out.append("sample and candidates: give one of them, not both")
        if self.sample is not None and not 1 <= self.sample <= dims.size:
            out.append(f"sample: {self.sample} candidates cannot be drawn from a space of "
                       f"{dims.size}; allowed: 1..{dims.size}")
        for i, spec in enumerate(self.candidates):
            try:
                if not dims.contains(spec):
                    out.append(f"candidates[{i}]: {spec!r} lies outside the choices")
            except ConfigError as exc:
                out.extend(f"candidates[{i}]: {p}" for p in exc.problems)
        return out

    def dims(self) -> ConvNetDims:
        return ConvNetDims(depths=self.depths, widths=self.widths, norms=self.norms,
                           acts=self.acts, pools=self.pools)

    def specs(self) -> list[str]:
        dims = self.dims()
        if self.candidates:
            return list(self.candidates)
        if self.sample is not None:
            return dims.sample(self.sample, seed=self.seed)
        return dims.specs()


@dataclass(kw_only=True)
class GroundTruthSpec:
    """How the real accuracies are measured, and where they are cached."""

    budget: TrainingBudget = field(default_factory=lambda: TrainingBudget(epochs=20))
    images_per_class: int | None = None
    """Train on this many real images per class (seeded); null: the whole training split."""
    cache_dir: str = "runs/nas-ground-truth"

    def problems(self) -> list[str]:
        if self.images_per_class is not None and self.images_per_class < 1:
            return [f"images_per_class: must be null or >= 1, got {self.images_per_class}"]
        return []


@dataclass(kw_only=True)
class SearchSpec:
    """The search strategy run on every proxy and on the real data."""

    strategy: str = "grid"
    """"grid" (every candidate), "random" or "evolution" (NNI's RegularizedEvolution)."""
    max_trials: int | None = None
    """Trials of a random or evolutionary search; a grid visits every candidate."""
    population_size: int = 10
    sample_size: int = 3
    mutation_prob: float = 0.5
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.strategy not in _STRATEGIES:
            out.append(f"strategy: {self.strategy!r} is not allowed; allowed: "
                       f"{', '.join(_STRATEGIES)}")
        if (self.strategy in _STRATEGIES and self.strategy != "grid"
                and (self.max_trials is None or self.max_trials < 1)):
            out.append(f"max_trials: a {self.strategy} search needs max_trials >= 1, "
                       f"got {self.max_trials}")
        if not 1 <= self.sample_size <= self.population_size:
            out.append(f"sample_size: must lie in 1..population_size ({self.population_size})"
                       f", got {self.sample_size}")
        if not 0 <= self.mutation_prob <= 1:
            out.append(f"mutation_prob: must lie in [0, 1], got {self.mutation_prob}")
        return out


@dataclass(kw_only=True)
class NasProxyScenario:
    """Proxies for architecture search, judged against real-data ground truth."""

    name: str
    kind: str = "nas-proxy"
    description: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    space: SpaceSpec = field(default_factory=SpaceSpec)
    validation_per_class: int = 20
    """Real training images per class held out to score candidates on."""
    ipc: int = 10
    """Images per class of every proxy that is made here."""
    proxies: list[Any] = field(default_factory=list)
    """Entries {method: NAME, ...options} (a ddsuite method, or full) or {artifact: PATH};
    `label` names the row."""
    proxy_budget: TrainingBudget = field(default_factory=TrainingBudget)
    ground_truth: GroundTruthSpec = field(default_factory=GroundTruthSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    distill_model: str | None = None
    """Model of every method that has one, unless its entry sets `model`."""
    seed: int = 0
    device: str = "auto"

    def problems(self) -> list[str]:
        out = scenario_name_problems(self.name)
        if self.validation_per_class < 1:
            out.append(f"validation_per_class: must be >= 1, got {self.validation_per_class}")
        if self.ipc < 1:
            out.append(f"ipc: must be >= 1, got {self.ipc}")
        allowed = ", ".join(["full", *list_methods()])
        if not self.proxies:
            out.append(f"proxies: name at least one, e.g. {{method: dm}}; methods: {allowed}")
        labels = []
        for i, entry in enumerate(self.proxies):
            if not isinstance(entry, dict) or ("method" in entry) == ("artifact" in entry):
                out.append(f"proxies[{i}]: expected a mapping with one of method or artifact, "
                           f"e.g. {{method: dm, iterations: 100}}, got {entry!r}")
                continue
            labels.append(self.proxy_label(entry))
            if "artifact" in entry:
                extra = sorted(set(entry) - {"artifact", "label"})
                if extra:
                    out.append(f"proxies[{i}]: an artifact takes no options, got "
                               f"{', '.join(extra)}")
                continue
            method = entry["method"]
            options = self.method_options(entry)
            if method == "full":
                if options:
                    out.append(f"proxies[{i}]: full takes no options, got {', '.join(options)}")
                continue
            if method not in list_methods():
                out.append(f"proxies[{i}].method: {method!r} is not allowed; allowed: {allowed}")
                continue
            if "ipc" in options:
                out.append(f"proxies[{i}].ipc: set ipc at the top level of the scenario")
                continue
            try:
                config_from_dict(get_method(method).Config, {**options, "ipc": self.ipc})
            except ConfigError as exc:
                out.extend(f"proxies[{i}].{p}" for p in exc.problems)
        duplicates = sorted({x for x in labels if labels.count(x) > 1})
        if duplicates:
            out.append(f"proxies: labels must be unique; repeated: {', '.join(duplicates)} "
                       "(set label: on an entry)")
        out.extend(device_problems(self.device))
        return out

    @staticmethod
    def proxy_label(entry: dict[str, Any]) -> str:
        if "label" in entry:
            return str(entry["label"])
        if "artifact" in entry:
            return Path(str(entry["artifact"])).name
        return str(entry["method"])

    def method_options(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The entry's method options, with `distill_model` where the method has a model."""
        options = {k: v for k, v in entry.items() if k not in ("method", "label")}
        method = entry["method"]
        if method == "full" or method not in list_methods():
            return options
        fields = get_method(method).Config.__dataclass_fields__
        if self.distill_model and "model" in fields and "model" not in options:
            options["model"] = self.distill_model
        return options


@contextmanager
def _nni_log_level(level: int) -> Iterator[None]:
    """NNI logs every trial at INFO level on its own handler; keep it to warnings here."""
    nni_logger = logging.getLogger("nni")
    before = nni_logger.level
    nni_logger.setLevel(level)
    try:
        yield
    finally:
        nni_logger.setLevel(before)


def _class_subset(labels: torch.Tensor, per_class: int, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True).tolist():
        indices = (labels == c).nonzero().flatten().cpu()
        chosen.append(indices[torch.randperm(len(indices), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def run_nas_proxy(scenario: NasProxyScenario, *, out_dir: Path, device: str | None = None,
                  resolved: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Rank the candidates on every proxy and on the real data; write the report folder."""
    try:
        import nni  # noqa: F401
    except ImportError:
        raise ConfigError(["the nas-proxy scenarios need NNI: pip install 'ddsuite[nas]' "
                           "(nni 3.0)"]) from None
    from .evaluator import ProxyScorer, TrialRecord, make_strategy, search
    from .space import ConvNetSpace

    # Everything checkable is checked before the report folder exists.
    device_ = resolve_device(device or scenario.device)
    spec = scenario.dataset
    splits = load_dataset(spec.name, data_root=spec.data_root, device=device_, zca=spec.zca,
                          download=spec.download)
    image_shape, classes = splits.train.image_shape, splits.train.num_classes
    specs = scenario.space.specs()
    check_candidates_fit(specs, image_shape=image_shape, num_classes=classes)
    search_splits, validation = hold_out(splits, per_class=scenario.validation_per_class,
                                         seed=scenario.seed)
    loaded = {scenario.proxy_label(e): load_proxy(e["artifact"], search_splits,
                                                  name=scenario.proxy_label(e))
              for e in scenario.proxies if "artifact" in e}
    for proxy in loaded.values():
        if proxy.meta["ipc"] != scenario.ipc:
            logger.warning("proxy %r holds %d images per class, the made proxies %d; their "
                           "sizes differ", proxy.name, proxy.meta["ipc"], scenario.ipc)
    search_splits.train.check_ipc(scenario.ipc)
    _check_proxy_models(scenario, image_shape=image_shape, num_classes=classes)
    gt_spec = scenario.ground_truth
    subset = None
    if gt_spec.images_per_class is not None:
        search_splits.train.check_ipc(gt_spec.images_per_class)
        subset = _class_subset(search_splits.train.labels, gt_spec.images_per_class,
                               seed=scenario.seed)
    prepare_out_dir(out_dir, resume=False, overwrite=overwrite, can_resume=False)
    with scenario_status(out_dir, scenario.name):
        write_text(out_dir / "scenario.yaml",
                   yaml.safe_dump(resolved or asdict(scenario), sort_keys=False))

        # Proxies, in the scenario's order.
        proxies: list[ProxySet] = []
        for entry in scenario.proxies:
            label = scenario.proxy_label(entry)
            if label in loaded:
                proxies.append(loaded[label])
                continue
            proxies.append(make_proxy(
                entry["method"], search_splits, ipc=scenario.ipc,
                config=scenario.method_options(entry), seed=scenario.seed, device=device_,
                name=label,
                out_dir=None if entry["method"] == "full" else out_dir / "sets" / label))
            print(f"proxy {label}: {proxies[-1].images.shape[0]} images, made in "
                  f"{proxies[-1].make_seconds:.1f} s", flush=True)

        # Ground truth: cached on disk, trained once.
        def progress(result) -> None:
            state = "cached" if result.cached else f"trained in {result.seconds:.1f} s"
            value = result.failed or f"test {result.test_mean:.2f}%"
            print(f"ground truth {result.candidate}: {value} ({state})", flush=True)

        truths = measure_ground_truth(
            specs, search_splits, validation=validation,
            validation_key={"per_class": scenario.validation_per_class, "seed": scenario.seed},
            budget=gt_spec.budget, cache=GroundTruthCache(gt_spec.cache_dir), device=device_,
            seed=scenario.seed, train_subset=subset, on_result=progress)
        real_test = {t.candidate: t.test_mean for t in truths}

        c, h, w = image_shape
        dims = scenario.space.dims()
        restricted = None if specs == dims.specs() else specs
        space = ConvNetSpace(in_channels=c, num_classes=classes, image_size=(h, w), dims=dims,
                             candidates=restricted)
        options = scenario.search

        def run_search(scorer: ProxyScorer) -> tuple[list[TrialRecord], dict[str, TrialRecord]]:
            from nni.nas.evaluator import FunctionalEvaluator

            evaluator = FunctionalEvaluator(scorer)
            strategy = make_strategy(options.strategy, seed=options.seed,
                                     population_size=options.population_size,
                                     sample_size=options.sample_size,
                                     mutation_prob=options.mutation_prob)
            with _nni_log_level(logging.WARNING):
                trials = search(space, evaluator, strategy=strategy,
                                max_trials=None if options.strategy == "grid" else
                                options.max_trials, seed=options.seed)
                if options.strategy != "grid":  # score the rest too, for the rank correlations
                    search(space, evaluator, strategy="grid")
            return trials, dict(scorer.memo)

        rows: dict[str, dict[str, Any]] = {}
        # The real-data search: the same strategy on the ground truth's validation scores.
        real_set = ProxySet(name="real data", kind="real", images=search_splits.train.images,
                            labels=search_splits.train.labels, num_classes=classes)
        real = ProxyScorer(real_set, validation=validation, budget=gt_spec.budget,
                           device=device_)
        real.memo = {t.candidate: TrialRecord(candidate=t.candidate, score=t.validation_mean,
                                              accuracies=t.validation, seconds=t.seconds,
                                              failed=t.failed) for t in truths}
        real_trials, real_memo = run_search(real)
        real_seconds = sum(t.seconds for t in real_trials)
        rows["real data"] = _row(real_trials, real_memo, real_test, search_seconds=real_seconds,
                                 real_seconds=real_seconds, proxy=None,
                                 real_images=int(truths[0].record.get("num_train_images", 0)))
        for proxy in proxies:
            scorer = ProxyScorer(proxy, validation=validation, budget=scenario.proxy_budget,
                                 device=device_, seed=scenario.seed)
            trials, memo = run_search(scorer)
            rows[proxy.name] = _row(trials, memo, real_test, search_seconds=sum(
                t.seconds for t in trials), real_seconds=real_seconds, proxy=proxy)
            print(f"proxy {proxy.name}: Spearman {_fmt(rows[proxy.name]['spearman'])}, picked "
                  f"{rows[proxy.name]['picked']} ({_fmt(rows[proxy.name]['picked_test'], 1)}%)",
                  flush=True)

        summary = _summary(scenario, splits, rows, truths, len(specs))
        metrics = {
            "scenario": scenario.name,
            "created": timestamp(),
            "dataset": splits.identity.to_dict(),
            "input_space": splits.input_space.to_dict(),
            "validation": {"per_class": scenario.validation_per_class, "seed": scenario.seed,
                           "images": int(validation[0].shape[0])},
            "candidates": specs,
            "proxy_budget": scenario.proxy_budget.to_dict(),
            "ground_truth": {
                "budget": gt_spec.budget.to_dict(), "images_per_class": gt_spec.images_per_class,
                "cache_dir": str(gt_spec.cache_dir),
                "results": [{"candidate": t.candidate, "validation": t.validation,
                             "test": t.test, "seconds": t.seconds, "failed": t.failed,
                             "cached": t.cached, "computed_on": t.record.get("device"),
                             "created": t.record.get("created")} for t in truths]},
            "search": asdict(options),
            "engine": "nni sequential (in-process)",
            "device": str(device_),
            "versions": library_versions(("nni",)),
            "proxies": rows,
        }
        _plot(out_dir / "plots" / "proxy_vs_real.png", rows, real_test)
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "summary.md", summary)
        logger.info("wrote %s", out_dir)
        return summary


def _check_proxy_models(scenario: NasProxyScenario, *, image_shape: tuple[int, ...],
                        num_classes: int) -> None:
    """Build the model of every proxy that distils with one, so a bad spec (distill_model,
    say) stops the run before anything is made or written."""
    for entry in scenario.proxies:
        if "method" not in entry or entry["method"] == "full":
            continue
        model = scenario.method_options(entry).get("model")
        if model is not None:
            try:
                EvaluationProtocol(models=(model,)).check_models(image_shape=image_shape,
                                                                 num_classes=num_classes)
            except ConfigError as exc:
                raise ConfigError(exc.problems, source=f"the model of proxy "
                                  f"{scenario.proxy_label(entry)!r} (distill_model or its "
                                  "model option)") from None


def _row(trials, memo, real_test: dict[str, float | None], *, search_seconds: float,
         real_seconds: float, proxy: ProxySet | None, real_images: int = 0) -> dict[str, Any]:
    """The metrics of one proxy (or of the real data when `proxy` is None)."""
    ranked = [k for k, r in memo.items() if r.score is not None and real_test.get(k) is not None]
    xs = [real_test[k] for k in ranked]
    ys = [memo[k].score for k in ranked]
    found = [t for t in trials if t.score is not None]
    picked = max(found, key=lambda t: t.score).candidate if found else None
    make = proxy.make_seconds if proxy is not None else 0.0
    return {
        "proxy": proxy.describe() if proxy is not None else {"name": "real data", "kind": "real",
                                                             "images": real_images},
        "ranked": len(ranked),
        "failed": sorted(k for k, r in memo.items() if r.failed),
        "spearman": spearman(xs, ys),
        "kendall": kendall(xs, ys),
        **{f"top{k}_spearman": top_k_spearman(xs, ys, k) for k in TOP_K},
        "picked": picked,
        "picked_test": real_test.get(picked) if picked else None,
        "search_trials": len(trials),
        "search_seconds": search_seconds,
        "make_seconds": make,
        # A proxy that ranked no candidate searched nothing: it has no speed-up.
        "speedup": real_seconds / search_seconds if ranked and search_seconds > 0 else None,
        "speedup_with_making": (real_seconds / (search_seconds + make)
                                if ranked and search_seconds + make > 0 else None),
        "scores": {k: {"score": r.score, "accuracies": r.accuracies, "seconds": r.seconds,
                       "failed": r.failed} for k, r in memo.items()},
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _short(spec: str | None) -> str:
    if spec is None:
        return "–"
    v = parse_candidate(spec)
    return f"d{v['depth']} w{v['width']} {v['norm']} {v['act']} {v['pool']}"


def _summary(scenario: NasProxyScenario, splits, rows: dict[str, dict[str, Any]], truths,
             n_candidates: int) -> str:
    best = max((t.test_mean for t in truths if t.test_mean is not None), default=None)
    table_rows = []
    for name, r in rows.items():
        table_rows.append([
            name, r["proxy"].get("images"), r["ranked"], len(r["failed"]),
            _fmt(r["spearman"]), _fmt(r["kendall"]),
            " / ".join(_fmt(r[f"top{k}_spearman"]) for k in TOP_K),
            _short(r["picked"]), _fmt(r["picked_test"], 1),
            f"{r['search_seconds']:.1f}", f"{r['make_seconds']:.1f}",
            _fmt(r["speedup"], 1)])
    table = markdown_table(
        ["proxy", "images", "ranked", "failed", "Spearman", "Kendall",
         "top-5 / 10 / 20 Spearman", "picked", "picked test (%)", "search s", "making s",
         "speed-up"], table_rows)
    gt, pb = scenario.ground_truth, scenario.proxy_budget
    used = ("the whole training split" if gt.images_per_class is None
            else f"{gt.images_per_class} images per class")
    cached = sum(t.cached for t in truths)
    return (
        f"# {scenario.name}\n\n{scenario.description.strip()}\n\n"
        f"{n_candidates} ConvNet candidates on {splits.identity.name}; search: "
        f"{scenario.search.strategy} in NNI's in-process sequential engine. Proxies "
        f"({scenario.ipc} images per class when made here) train {pb.num_eval} network(s) per "
        f"candidate for {pb.epochs} epochs (lr {pb.lr}, batch {pb.batch_size}, augmentation "
        f"{pb.augmentation}) and are scored on {scenario.validation_per_class} held-out "
        f"training images per class. Ground truth: {gt.budget.num_eval} network(s) per "
        f"candidate, {gt.budget.epochs} epochs on {used}, tested on the real test split "
        f"({cached} of {len(truths)} read from the cache in {gt.cache_dir}). Correlations "
        "are between proxy validation accuracy and real test accuracy over the ranked "
        "candidates; top-k uses the k best real candidates. Speed-up: real-data search time "
        "over proxy search time (making the proxy not included; it is listed). Best real "
        f"test accuracy of any candidate: {_fmt(best, 1)}%.\n\n{table}\n"
    )


def _plot(path: Path, rows: dict[str, dict[str, Any]], real_test: dict[str, float | None]
          ) -> None:
    """One scatter per proxy: proxy validation accuracy against real test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), squeeze=False)
    for ax, (name, r) in zip(axes[0], rows.items()):
        keys = [k for k, s in r["scores"].items()
                if s["score"] is not None and real_test.get(k) is not None]
        ax.scatter([real_test[k] for k in keys], [r["scores"][k]["score"] for k in keys], s=12)
        if r["picked"] in keys:
            ax.scatter([real_test[r["picked"]]], [r["scores"][r["picked"]]["score"]],
                       s=60, facecolors="none", edgecolors="red", label="picked")
            ax.legend(fontsize=7)
        ax.set_title(f"{name} (rho {_fmt(r['spearman'])})", fontsize=9)
        ax.set_xlabel("real test accuracy (%)", fontsize=8)
        ax.set_ylabel("proxy validation accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


register_scenario_kind(ScenarioKind(
    name="nas-proxy", schema=NasProxyScenario, run=run_nas_proxy,
    summary="rank architectures on distilled and coreset proxies against real-data training"))
