"""The "privacy" scenario: utility and membership leakage of real, distilled, DP-distilled and
DP-SGD-trained models on one disjoint member / non-member split.

The real training split is cut (by the scenario's seed) into members, non-members and a
shadow pool. Each target is one pipeline applied to the members:

- ``real``: a network trained on the members;
- ``distilled``: a network trained on a non-private distilled set of the members (DM);
- ``dp-distilled@eps``: a network trained on a private distilled set (DP-DM), per epsilon;
- ``dp-sgd@eps``: a network trained on the members by Opacus's DP-SGD, per epsilon.

Every target is audited on all members and non-members by the loss-threshold attack and by
offline LiRA, whose shadows run the same pipeline on random shadow-pool subsets of the
members' size. The report folder holds `summary.md`, `metrics.json` (accuracy, privacy
records, attack metrics with bootstrap intervals, the split's indices, provenance), the
private sets under `sets/`, and ROC and accuracy-against-epsilon plots under `plots/`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from ddsuite.core.atomic import atomic_write, write_json, write_text
from ddsuite.core.data import DatasetSplits, RealDataset, load_dataset
from ddsuite.core.device import device_problems, resolve_device
from ddsuite.core.engine import distill, prepare_out_dir, scenario_status
from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.core.evaluation import EvaluationProtocol, train_networks
from ddsuite.core.methods import config_from_dict, get_method, list_methods
from ddsuite.core.models import build_model
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import markdown_table
from ddsuite.scenarios.compare import DatasetSpec
from ddsuite.scenarios.registry import (
    ScenarioKind,
    register_scenario_kind,
    scenario_name_problems,
)

from .accounting import ACCOUNTANTS, budget_problems, epsilon_problems, plan_privacy
from .audit import (
    ATTACKS,
    MembershipSplit,
    attack_metrics,
    example_losses,
    lira_offline_scores,
    logit_confidence,
    make_membership_split,
    roc_points,
)
from .dpsgd import DPSGDConfig, build_private_model, train_dp_sgd
from .inputs import normalisation_record
from .ledger import distill_private

__all__ = ["AuditSpec", "PrivacyScenario", "TARGET_KINDS", "TrainSpec", "run_privacy"]

logger = logging.getLogger(__name__)

TARGET_KINDS = ("real", "distilled", "dp-distilled", "dp-sgd")


@dataclass(kw_only=True)
class TrainSpec:
    """How target and shadow networks are trained on real members and on synthetic sets."""

    real_epochs: int = 20
    syn_epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256

    def problems(self) -> list[str]:
        out = [f"{k}: must be >= 1, got {getattr(self, k)}"
               for k in ("real_epochs", "syn_epochs", "batch_size") if getattr(self, k) < 1]
        if not self.lr > 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        return out

    def protocol(self, *, synthetic: bool) -> EvaluationProtocol:
        return EvaluationProtocol(
            name="privacy-syn" if synthetic else "privacy-real", num_eval=1,
            epochs=self.syn_epochs if synthetic else self.real_epochs, lr=self.lr,
            momentum=self.momentum, weight_decay=self.weight_decay, batch_size=self.batch_size)


@dataclass(kw_only=True)
class AuditSpec:
    """The membership split and the attacks."""

    members: int | None = None
    """Members (the targets' training set); null: a third of the training split."""
    non_members: int | None = None
    """Audited non-members; null: as many as members."""
    shadows: int = 4
    """LiRA shadow pipelines per target (offline LiRA; fewer is cheaper and noisier)."""
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    """Attacks to run: loss (threshold on the loss), lira (offline LiRA)."""
    global_variance: bool = True
    """Pool LiRA's variance over examples (recommended below ~64 shadows)."""
    fprs: list[float] = field(default_factory=lambda: [0.001, 0.01])
    """False-positive rates at which the TPR is reported."""
    bootstrap: int = 200
    """Bootstrap resamples for the confidence intervals (>= 1)."""

    def problems(self) -> list[str]:
        out = []
        for name in ("members", "non_members"):
            value = getattr(self, name)
            if value is not None and value < 2:
                out.append(f"{name}: must be null or >= 2 (the balanced accuracy picks its "
                           f"threshold on one half and measures it on the other), got {value}")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if not self.attacks or bad:
            out.append(f"attacks: expected a non-empty list of {', '.join(ATTACKS)}, got "
                       f"{self.attacks!r}")
        if "lira" in self.attacks and self.shadows < 1:
            out.append(f"shadows: lira needs >= 1 shadow, got {self.shadows}")
        if any(not 0 < f < 1 for f in self.fprs):
            out.append(f"fprs: each must lie in (0, 1), got {self.fprs!r}")
        if self.bootstrap < 1:
            out.append(f"bootstrap: must be >= 1 (every metric is reported with a bootstrap "
                       f"interval; 100 or more for usable intervals), got {self.bootstrap}")
        return out


@dataclass(kw_only=True)
class PrivacyScenario:
    """Private distillation against DP-SGD, audited by membership inference."""

    name: str
    kind: str = "privacy"
    description: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    ipc: int = 10
    model: str = "convnet(width=32)"
    targets: list[str] = field(default_factory=lambda: list(TARGET_KINDS))
    epsilons: list[float] = field(default_factory=lambda: [1.0, 10.0])
    delta: float = 1e-5
    accountant: str = "rdp"
    distill_method: str = "dm"
    distill_options: dict[str, Any] = field(default_factory=dict)
    private_method: str = "dp-dm"
    private_options: dict[str, Any] = field(default_factory=dict)
    dp_sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    train: TrainSpec = field(default_factory=TrainSpec)
    audit: AuditSpec = field(default_factory=AuditSpec)
    published: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"

    def problems(self) -> list[str]:
        out = scenario_name_problems(self.name)
        if self.ipc < 1:
            out.append(f"ipc: must be >= 1, got {self.ipc}")
        bad = [t for t in self.targets if t not in TARGET_KINDS]
        if not self.targets or bad or len(set(self.targets)) != len(self.targets):
            out.append(f"targets: expected distinct values of {', '.join(TARGET_KINDS)}, got "
                       f"{self.targets!r}")
        private = {"dp-distilled", "dp-sgd"} & set(self.targets)
        if private and not self.epsilons:
            out.append("epsilons: private targets need at least one epsilon, e.g. [1, 10]")
        for eps in self.epsilons:
            out.extend(f"epsilons: {p}" for p in epsilon_problems(eps))
        out.extend(_duplicate_epsilons(self.epsilons))
        out.extend(budget_problems(epsilon=None, delta=self.delta))
        if self.accountant not in ACCOUNTANTS:
            out.append(f"accountant: {self.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
        if self.dataset.zca and private:
            out.append("dataset.zca: the ZCA matrix would be fitted on the training split, "
                       "which holds the private members, and released with no privacy "
                       "accounting; private targets need dataset.zca: false")
        for key, method, options in (("distill", self.distill_method, self.distill_options),
                                     ("private", self.private_method, self.private_options)):
            if method not in list_methods():
                out.append(f"{key}_method: {method!r} is not a method; allowed: "
                           + ", ".join(list_methods()))
                continue
            reserved = {"ipc", "model", "epsilon", "delta", "accountant"} & set(options)
            if key == "distill":
                reserved -= {"epsilon", "delta", "accountant"}
            if reserved:
                out.append(f"{key}_options: set {', '.join(sorted(reserved))} at the top level "
                           "of the scenario, not per method")
                continue
            config_cls = get_method(method).Config
            try:
                config_from_dict(config_cls, self.method_config(key, 1.0))
            except ConfigError as exc:
                # delta and accountant come from the top level and are checked there
                out.extend(_option_problem(key, config_cls, p) for p in exc.problems
                           if not p.startswith(("delta", "accountant")))
        if "dp-distilled" in self.targets and self.private_method not in ("dp-dm", "dp-dc"):
            out.append(f"private_method: {self.private_method!r} is not private; use dp-dm or "
                       "dp-dc")
        out.extend(f"dp_sgd.{p}" for p in self.dp_sgd.problems()
                   if not p.startswith(("epsilon", "delta")))
        defaults = DPSGDConfig()
        moved = [name for name, top in (("epsilon", "epsilons"), ("delta", "delta"),
                                        ("accountant", "accountant"))
                 if getattr(self.dp_sgd, name) != getattr(defaults, name)]
        if moved:  # the top-level budget would silently replace them
            out.append(f"dp_sgd: {', '.join(moved)} {'comes' if len(moved) == 1 else 'come'} "
                       "from the top level of the scenario "
                       "(epsilons, delta, accountant), which every private target shares; "
                       "remove them from dp_sgd")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 31:
            out.append(f"seed: expected an integer in 0..{2 ** 31 - 1}, got {self.seed!r}")
        out.extend(device_problems(self.device))
        return out

    def description_lines(self) -> str:
        """What this run does, from its resolved values (not the file's description, which
        overrides may have made stale)."""
        private = {"dp-distilled", "dp-sgd"} & set(self.targets)
        eps = (f" at epsilon {', '.join(f'{e:g}' for e in self.epsilons)} (delta "
               f"{self.delta:g}, {self.accountant} accountant)" if private else "")
        methods = [f"{self.distill_method} for distilled"] if "distilled" in self.targets else []
        if "dp-distilled" in self.targets:
            methods.append(f"{self.private_method} for dp-distilled")
        via = f" ({'; '.join(methods)})" if methods else ""
        return (f"Targets {', '.join(self.targets)}{via} on {self.dataset.name}{eps}, "
                f"audited by {', '.join(self.audit.attacks)} with "
                f"{self.audit.shadows} shadow(s) per target.")

    def method_config(self, key: str, epsilon: float) -> dict[str, Any]:
        """The options of the non-private ("distill") or private ("private") method."""
        if key == "distill":
            return {**self.distill_options, "ipc": self.ipc, "model": self.model}
        return {**self.private_options, "ipc": self.ipc, "model": self.model,
                "epsilon": epsilon, "delta": self.delta, "accountant": self.accountant}

    def target_list(self) -> list[tuple[str, str, float | None]]:
        """(label, kind, epsilon) of every target, in report order."""
        out = []
        for kind in TARGET_KINDS:
            if kind not in self.targets:
                continue
            if kind in ("real", "distilled"):
                out.append((kind, kind, None))
            else:
                out.extend((f"{kind}@{eps:g}", kind, eps) for eps in self.epsilons)
        return out


def _duplicate_epsilons(epsilons: list[float]) -> list[str]:
    """Epsilons whose target labels (formatted with :g) coincide; each label names a
    report entry and a folder, so they must differ."""
    labels: dict[str, list[Any]] = {}
    for eps in epsilons:
        try:
            labels.setdefault(f"{eps:g}", []).append(eps)
        except (TypeError, ValueError):
            continue  # reported as a malformed epsilon
    return [f"epsilons: {', '.join(map(repr, values))} are the same target (each labelled "
            f"@{label}); give each epsilon once, with values that differ in their first six "
            "significant digits" for label, values in labels.items() if len(values) > 1]


def _option_problem(key: str, config_cls: type, problem: str) -> str:
    """`private_options.clip_norm must ...` when the problem starts with an option's name,
    `private_options: give exactly one ...` otherwise."""
    head = problem.split(":", 1)[0].split(" ", 1)[0]
    if head in {f.name for f in fields(config_cls)}:
        return f"{key}_options.{problem}"
    return f"{key}_options: {problem}"


# -- data subsets --------------------------------------------------------------------------


def subset_splits(splits: DatasetSplits, index: Tensor, *, tag: str) -> DatasetSplits:
    """The splits with the training split cut to `index`; the identity records the cut
    (its fingerprint hashes the parent's with the indices)."""
    train = splits.train
    index = index.to(train.device)
    digest = hashlib.sha256(splits.identity.fingerprint.encode()
                            + index.cpu().numpy().astype(np.int64).tobytes()).hexdigest()
    identity = replace(splits.identity, name=f"{splits.identity.name}[{tag}]",
                       num_train=int(index.numel()), fingerprint=digest)
    subset = RealDataset(train.images[index], train.labels[index],
                         num_classes=train.num_classes, class_names=train.class_names)
    return DatasetSplits(subset, splits.test, identity, splits.input_space)


# -- pipelines -----------------------------------------------------------------------------


@dataclass
class Trained:
    """One pipeline's output: a classifier and what it cost and spent."""

    forward: Callable[[Tensor], Tensor]
    privacy: dict[str, Any] | None
    seconds: float


def _run_pipeline(scenario: PrivacyScenario, kind: str, epsilon: float | None,
                  data: DatasetSplits, *, seed: int, device: torch.device,
                  out_dir: Path | None) -> Trained:
    """Apply target `kind` to `data.train` and train its classifier."""
    start = time.perf_counter()
    num_classes = data.train.num_classes
    privacy = None
    if kind == "dp-sgd":
        config = replace(scenario.dp_sgd, epsilon=epsilon, delta=scenario.delta,
                         accountant=scenario.accountant)
        result = train_dp_sgd(data.train.images, data.train.labels, model=scenario.model,
                              num_classes=num_classes, config=config, device=device, seed=seed)
        model = result.model

        def forward(x: Tensor) -> Tensor:
            return model(x)

        privacy = {**result.privacy,
                   "normalisation": normalisation_record(data, what="dp-sgd")}
        return Trained(forward, privacy, time.perf_counter() - start)
    if kind == "real":
        images, labels = data.train.images, data.train.labels
    elif kind == "distilled":
        result = distill(scenario.distill_method, splits=data, seed=seed, device=device,
                         config=scenario.method_config("distill", 0.0), out_dir=out_dir,
                         checkpoint_every=0)
        images, labels = result.syn.images_syn.detach(), result.syn.labels_syn
    else:
        result, privacy = distill_private(
            scenario.private_method, splits=data, seed=seed, device=device,
            config=scenario.method_config("private", epsilon), out_dir=out_dir)
        images, labels = result.syn.images_syn.detach(), result.syn.labels_syn
    nets = train_networks(images, labels, model=scenario.model, num_classes=num_classes,
                          protocol=scenario.train.protocol(synthetic=kind != "real"),
                          device=device, seed=seed, num_networks=1)

    def forward(x: Tensor) -> Tensor:
        return nets.forward(x)[0]

    return Trained(forward, privacy, time.perf_counter() - start)


@torch.no_grad()
def _accuracy(forward: Callable[[Tensor], Tensor], data: DatasetSplits,
              device: torch.device) -> float:
    correct = 0
    images, labels = data.test.images.to(device), data.test.labels.to(device)
    for lo in range(0, images.shape[0], 1024):
        correct += int((forward(images[lo:lo + 1024]).argmax(1) == labels[lo:lo + 1024]).sum())
    return correct / images.shape[0]


# -- the run -------------------------------------------------------------------------------


def run_privacy(scenario: PrivacyScenario, *, out_dir: Path, device: str | None = None,
                resolved: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Run every target and its audit; write the report; return its summary."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError(["the privacy scenarios need Opacus: pip install "
                           "'ddsuite[privacy]' (opacus 1.6.0)"]) from None
    device_ = resolve_device(device or scenario.device)
    spec = scenario.dataset
    splits = load_dataset(spec.name, data_root=spec.data_root, device=device_, zca=spec.zca,
                          download=spec.download)
    split = _membership(scenario, splits)
    _precheck(scenario, splits, split, device_)
    prepare_out_dir(out_dir, resume=False, overwrite=overwrite, can_resume=False)
    with scenario_status(out_dir, scenario.name):
        write_text(out_dir / "scenario.yaml",
                   yaml.safe_dump(resolved or asdict(scenario), sort_keys=False))
        return _run_all(scenario, splits, split, out_dir, device_,
                        resolved=resolved or asdict(scenario))


def _membership(scenario: PrivacyScenario, splits: DatasetSplits) -> MembershipSplit:
    n = len(splits.train)
    members = scenario.audit.members or n // 3
    non_members = scenario.audit.non_members or members
    return make_membership_split(n, members=members, non_members=non_members,
                                 seed=scenario.seed)


def _precheck(scenario: PrivacyScenario, splits: DatasetSplits, split: MembershipSplit,
              device: torch.device) -> None:
    """Everything that can fail before any training: model, IPC, budgets, method configs."""
    c, h, w = splits.train.image_shape
    classes = splits.train.num_classes
    try:
        build_model(scenario.model, in_channels=c, num_classes=classes, image_size=(h, w),
                    device="cpu")
    except DDSuiteError as exc:
        raise ConfigError([f"model: {exc}"]) from None
    members = subset_splits(splits, split.members, tag="members")
    members.train.check_ipc(scenario.ipc)
    problems: list[str] = []
    n = len(members.train)
    for label, kind, eps in scenario.target_list():
        try:
            if kind == "dp-distilled":
                config = scenario.method_config("private", eps)
                get_method(scenario.private_method)(
                    get_method(scenario.private_method).Config(**config).resolve(
                        dataset=splits.identity.name), splits=members, device="cpu")
            elif kind == "dp-sgd":
                build_private_model(scenario.model, image_shape=(c, h, w), num_classes=classes,
                                    device="cpu", fix=scenario.dp_sgd.fix_model, what=label)
                batches = -(-n // min(scenario.dp_sgd.batch_size, n))
                plan_privacy(delta=scenario.delta, sample_rate=1 / batches,
                             steps=scenario.dp_sgd.epochs * batches,
                             clip_norm=scenario.dp_sgd.clip_norm, target_epsilon=eps,
                             accountant=scenario.accountant, dataset_size=n)
        except ConfigError as exc:
            problems.extend(p if p.startswith(f"{label}:") else f"{label}: {p}"
                            for p in exc.problems)
    if problems:
        raise ConfigError(problems, source=f"scenario {scenario.name}")


def _seed(base: int, target: int, shadow: int) -> int:
    return base * 1_000 + target * 100 + shadow + 1


def _run_all(scenario: PrivacyScenario, splits: DatasetSplits, split: MembershipSplit,
             out_dir: Path, device: torch.device, *, resolved: dict[str, Any]) -> str:
    audit = scenario.audit
    members = subset_splits(splits, split.members, tag="members")
    audit_index = torch.cat([split.members, split.non_members])
    audit_images = splits.train.images[audit_index.to(splits.train.device)]
    audit_labels = splits.train.labels[audit_index.to(splits.train.device)]
    is_member = np.r_[np.ones(len(split.members)), np.zeros(len(split.non_members))]
    generator = torch.Generator().manual_seed(scenario.seed)

    results: dict[str, Any] = {}
    scores_for_plots: dict[str, dict[str, np.ndarray]] = {}
    for t, (label, kind, eps) in enumerate(scenario.target_list()):
        set_dir = out_dir / "sets" / label if kind in ("distilled", "dp-distilled") else None
        target = _run_pipeline(scenario, kind, eps, members, seed=_seed(scenario.seed, t, 0),
                               device=device, out_dir=set_dir)
        accuracy = _accuracy(target.forward, splits, device)
        losses = example_losses(target.forward, audit_images, audit_labels)
        entry: dict[str, Any] = {"kind": kind, "epsilon_target": eps,
                                 "test_accuracy": accuracy, "privacy": target.privacy,
                                 "seconds": target.seconds, "attacks": {}}
        scores = {}
        if "loss" in audit.attacks:
            scores["loss"] = (-losses).numpy()
        if "lira" in audit.attacks:
            confidences = logit_confidence(target.forward, audit_images, audit_labels)
            shadow_conf = []
            shadow_seconds = 0.0
            for s in range(audit.shadows):
                pick = torch.randperm(len(split.shadow_pool), generator=generator)
                index = split.shadow_pool[pick[:len(split.members)]].sort().values
                data = subset_splits(splits, index, tag=f"shadow-{s}")
                shadow = _run_pipeline(scenario, kind, eps, data,
                                       seed=_seed(scenario.seed, t, s + 1), device=device,
                                       out_dir=None)
                shadow_seconds += shadow.seconds
                shadow_conf.append(logit_confidence(shadow.forward, audit_images,
                                                    audit_labels))
            scores["lira"] = lira_offline_scores(
                confidences, torch.stack(shadow_conf),
                global_variance=audit.global_variance).numpy()
            entry["shadow_seconds"] = shadow_seconds
        for attack, values in scores.items():
            entry["attacks"][attack] = attack_metrics(values, is_member, fprs=audit.fprs,
                                                      bootstrap=audit.bootstrap,
                                                      seed=scenario.seed)
        scores_for_plots[label] = scores
        results[label] = entry
        eps_text = "" if target.privacy is None else f", epsilon {target.privacy['epsilon']:.3g}"
        aucs = ", ".join(f"{a} AUC {m['auc']['value']:.3f}" for a, m in entry["attacks"].items())
        print(f"{label:>18}: test accuracy {100 * accuracy:.1f}%{eps_text}; {aucs} "
              f"({target.seconds + entry.get('shadow_seconds', 0.0):.0f} s)", flush=True)

    summary = _summary(scenario, splits, split, results)
    metrics = {
        "scenario": scenario.name,
        "created": timestamp(),
        "config": resolved,
        "dataset": splits.identity.to_dict(),
        "input_space": splits.input_space.to_dict(),
        "model": scenario.model,
        "ipc": scenario.ipc,
        "delta": scenario.delta,
        "accountant": scenario.accountant,
        "membership": split.to_dict(),
        "audit": asdict(audit),
        "train": asdict(scenario.train),
        "published": scenario.published,
        "device": str(device),
        "versions": library_versions(("opacus", "scikit-learn")),
        "results": results,
    }
    _plots(out_dir / "plots", scenario, results, scores_for_plots, is_member)
    write_json(out_dir / "metrics.json", metrics)
    write_text(out_dir / "summary.md", summary)
    logger.info("wrote %s", out_dir)
    return summary


def _ci(metric: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return (f"{scale * metric['value']:.{digits}f} [{scale * metric['ci_low']:.{digits}f}, "
            f"{scale * metric['ci_high']:.{digits}f}]")


def _summary(scenario: PrivacyScenario, splits: DatasetSplits, split: MembershipSplit,
             results: dict[str, Any]) -> str:
    fprs = scenario.audit.fprs
    rows = []
    for label, entry in results.items():
        privacy = entry["privacy"]
        eps = "∞" if privacy is None else f"{privacy['epsilon']:.3g}"
        for attack, m in entry["attacks"].items():
            rows.append([label, f"{100 * entry['test_accuracy']:.1f}", eps, attack,
                         _ci(m["auc"], 1.0, 3), _ci(m["balanced_accuracy"])]
                        + [_ci(m[f"tpr_at_{f:g}_fpr"], 100.0, 2) for f in fprs])
    headers = (["target", "test acc (%)", "epsilon spent", "attack", "AUC [95% CI]",
                "held-out balanced acc (%)"] + [f"TPR @ {100 * f:g}% FPR (%)" for f in fprs])
    privacy_rows = []
    for label, entry in results.items():
        p = entry["privacy"]
        if p is not None:
            privacy_rows.append([label, p["accountant"], f"{p['epsilon']:.4g}",
                                 f"{p['delta']:g}", f"{p['noise_multiplier']:.4g}",
                                 f"{p['clip_norm']:g}", f"{p['sample_rate']:.4g}",
                                 str(p["steps"])])
    parts = [
        f"# {scenario.name}\n\n{scenario.description_lines()}\n",
        f"{splits.identity.name}: {len(split.members)} members, {len(split.non_members)} "
        f"non-members, shadow pool {len(split.shadow_pool)} (disjoint; indices in "
        f"metrics.json). Targets and shadows: {scenario.model}; synthetic sets of "
        f"{scenario.ipc} images per class. Offline LiRA with {scenario.audit.shadows} "
        f"shadow(s) per target. Intervals: {scenario.audit.bootstrap} bootstrap resamples. "
        f"TPR at an FPR below 1/{len(split.non_members)} is the TPR with no false positive. "
        "The balanced accuracy is held out: its threshold is chosen on a random half of the "
        "members and non-members and the accuracy is measured (and bootstrapped) on the "
        "other half. The input normalisation constants are treated as public (see each "
        "privacy record's `normalisation`).\n",
        markdown_table(headers, rows),
    ]
    if privacy_rows:
        parts.append("\nPrivacy spent (Opacus accountant, after the steps actually taken):\n\n"
                     + markdown_table(["target", "accountant", "epsilon", "delta",
                                       "noise multiplier", "clip norm", "sample rate",
                                       "steps"], privacy_rows))
    if scenario.published:
        parts.append("\nPublished reference points (test accuracy, %; other settings, quoted "
                     "for orientation only):\n\n" + markdown_table(
                         ["reference", "accuracy (%)"],
                         [[k, f"{v:g}"] for k, v in scenario.published.items()]))
    return "\n".join(parts) + "\n"


def _plots(folder: Path, scenario: PrivacyScenario, results: dict[str, Any],
           scores: dict[str, dict[str, np.ndarray]], is_member: np.ndarray) -> None:
    """ROC curves (log-log) per attack, and test accuracy against epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for attack in scenario.audit.attacks:
        fig, ax = plt.subplots(figsize=(5, 4.5))
        for label, by_attack in scores.items():
            fpr, tpr = roc_points(by_attack[attack], is_member)
            auc = results[label]["attacks"][attack]["auc"]["value"]
            ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=f"{label} ({auc:.3f})")
        ax.plot([1e-5, 1], [1e-5, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title(f"membership inference: {attack}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(folder / f"roc_{attack}.png",
                     lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for kind, marker in (("dp-distilled", "o"), ("dp-sgd", "s")):
        points = sorted((e["privacy"]["epsilon"], 100 * e["test_accuracy"])
                        for e in results.values() if e["kind"] == kind)
        if points:
            ax.plot(*zip(*points), marker=marker, label=kind)
    for kind, style in (("real", "--"), ("distilled", ":")):
        for e in results.values():
            if e["kind"] == kind:
                ax.axhline(100 * e["test_accuracy"], linestyle=style, color="grey",
                           label=f"{kind} (no privacy)")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(folder / "accuracy_vs_epsilon.png",
                 lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


register_scenario_kind(ScenarioKind(
    name="privacy", schema=PrivacyScenario, run=run_privacy,
    summary="DP distillation (Opacus-accounted) vs DP-SGD, audited by membership inference"))
