"""The "distill-compare" scenario: several methods at several IPCs under one protocol.

Every set is distilled into its own artifact folder and evaluated under the scenario's single
evaluation protocol, so the numbers in the table are comparable with each other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddsuite.core.atomic import write_json, write_text
from ddsuite.core.data import list_datasets, load_dataset
from ddsuite.core.device import device_problems, resolve_device
from ddsuite.core.engine import (FinalEvaluation, ImageGrid, ProgressBar, distill,
                                  prepare_out_dir, scenario_status)
from ddsuite.core.errors import ConfigError
from ddsuite.core.evaluation import EvaluationProtocol, mean_std
from ddsuite.core.methods import config_from_dict, get_method, list_methods
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import format_mean_std, markdown_table
from ddsuite.core.synthetic import META_FILE

from .registry import ScenarioKind, register_scenario_kind, scenario_name_problems

__all__ = ["CompareScenario", "DatasetSpec", "run_compare"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DatasetSpec:
    """Which dataset to distil and how to load it."""

    name: str = "digits"
    data_root: str | None = None
    zca: bool = False
    download: bool = False

    def problems(self) -> list[str]:
        known = list_datasets()
        if self.name not in known and not self.name.startswith("imagefolder:"):
            return [f"name: unknown dataset {self.name!r}; allowed: {', '.join(known)}"]
        return []


@dataclass(kw_only=True)
class CompareScenario:
    """A comparison of distillers on one dataset under one evaluation protocol."""

    name: str
    kind: str = "distill-compare"
    description: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    # Typed loosely here and checked item by item in problems(), so one malformed entry does
    # not hide the problems of the others.
    methods: list[Any] = field(default_factory=list)
    ipc: list[Any] = field(default_factory=lambda: [1, 10])
    seeds: list[Any] = field(default_factory=lambda: [0])
    evaluation: EvaluationProtocol = field(default_factory=EvaluationProtocol)
    device: str = "auto"

    def problems(self) -> list[str]:
        out = scenario_name_problems(self.name)
        if not self.methods:
            out.append("methods: name at least one method, e.g. [{name: dm}]")
        for i, entry in enumerate(self.methods):
            if not isinstance(entry, dict):
                out.append(f"methods[{i}]: expected a mapping such as {{name: dm, "
                           f"iterations: 100}}, got {entry!r}")
                continue
            name = entry.get("name")
            if name not in list_methods():
                out.append(f"methods[{i}].name: {name!r} is not a method; allowed: "
                           + ", ".join(list_methods()))
                continue
            options = {k: v for k, v in entry.items() if k != "name"}
            if "ipc" in options:
                out.append(f"methods[{i}].ipc: set ipc at the top level of the scenario")
                continue
            try:
                config_from_dict(get_method(name).Config, options)
            except ConfigError as exc:
                out.extend(f"methods[{i}].{p}" for p in exc.problems)
        if not self.ipc or any(not _is_int(v) or v < 1 for v in self.ipc):
            out.append(f"ipc: expected a non-empty list of integers >= 1, got {self.ipc!r}")
        if not self.seeds or any(not _is_int(v) for v in self.seeds):
            out.append(f"seeds: expected a non-empty list of integers, got {self.seeds!r}")
        out.extend(device_problems(self.device))
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_compare(scenario: CompareScenario, *, out_dir: Path, device: str | None = None,
                resolved: dict[str, Any] | None = None, overwrite: bool = False) -> str:
    """Run the comparison, write the report folder and return the markdown summary.

    Everything that can be checked (device, dataset, models) is checked before the report
    folder is created, so a failed start leaves nothing behind.
    """
    device_ = resolve_device(device or scenario.device)
    spec = scenario.dataset
    splits = load_dataset(spec.name, data_root=spec.data_root, device=device_, zca=spec.zca,
                          download=spec.download)
    protocol = scenario.evaluation
    protocol.check_models(image_shape=splits.train.image_shape,
                          num_classes=splits.train.num_classes)
    for ipc in scenario.ipc:
        splits.train.check_ipc(ipc)
    prepare_out_dir(out_dir, resume=False, overwrite=overwrite, can_resume=False)
    with scenario_status(out_dir, scenario.name):
        write_text(out_dir / "scenario.yaml",
                   yaml.safe_dump(resolved or asdict(scenario), sort_keys=False))

        results: dict[str, dict[int, dict[str, Any]]] = {}
        for ipc in scenario.ipc:
            for entry in scenario.methods:
                name = entry["name"]
                options = {k: v for k, v in entry.items() if k != "name"}
                accuracies: list[float] = []
                seconds = 0.0
                for seed in scenario.seeds:
                    label = f"{name}-ipc{ipc}-seed{seed}"
                    result = distill(
                        name, splits=splits, config={**options, "ipc": ipc}, seed=seed,
                        device=device_, out_dir=out_dir / "sets" / label, protocol=protocol,
                        callbacks=[ProgressBar(label), FinalEvaluation(protocol),
                                   ImageGrid(out_dir / "sets" / label)],
                        checkpoint_every=0,
                    )
                    evaluation = result.metrics["evaluation"]["scores"]
                    for score in evaluation.values():
                        accuracies.extend(score["accuracies"])
                    seconds += result.seconds
                    scores = ", ".join(f"{m} {format_mean_std(s['mean'], s['std'])}"
                                       for m, s in evaluation.items())
                    print(f"{label}: {scores}")
                mean, std = mean_std(accuracies)
                stored = json.loads((out_dir / "sets" / label / META_FILE).read_text())
                results.setdefault(name, {})[ipc] = {
                    "mean": mean, "std": std, "accuracies": accuracies,
                    "distill_seconds": seconds / len(scenario.seeds),
                    "storage_ipc": stored["storage_ipc"], "decoded_ipc": stored["decoded_ipc"],
                }

        headers = ["method"] + [f"IPC {ipc}" for ipc in scenario.ipc]
        rows = [[name] + [format_mean_std(by_ipc[ipc]["mean"], by_ipc[ipc]["std"])
                          for ipc in scenario.ipc] for name, by_ipc in results.items()]
        table = markdown_table(headers, rows)
        # Sets compared at one IPC may store and decode to different amounts.
        storage = "".join(
            f"- {name} at IPC {ipc} stores {r['storage_ipc']:g} images per class (in bytes) "
            f"and trains networks on {r['decoded_ipc']} per class.\n"
            for name, by_ipc in results.items() for ipc, r in by_ipc.items()
            if r["decoded_ipc"] != ipc or r["storage_ipc"] > ipc * 1.05)
        if storage:
            table += "\nNot every set has the size its IPC suggests:\n\n" + storage
        models = ", ".join(protocol.models)
        summary = (
            f"# {scenario.name}\n\n{scenario.description.strip()}\n\n"
            f"Test accuracy (%) on {splits.identity.name}, mean ± std over "
            f"{protocol.num_eval} networks x {len(scenario.seeds)} seed(s); model(s) {models}; "
            f"{protocol.resolved_epochs} epochs, augmentation {protocol.augmentation}.\n\n"
            f"{table}\n"
        )
        metrics = {
            "scenario": scenario.name,
            "created": timestamp(),
            "dataset": splits.identity.to_dict(),
            "input_space": splits.input_space.to_dict(),
            "protocol": protocol.to_dict(),
            "device": str(device_),
            "versions": library_versions(),
            "results": {name: {str(ipc): r for ipc, r in by_ipc.items()}
                        for name, by_ipc in results.items()},
        }
        write_json(out_dir / "metrics.json", metrics)
        write_text(out_dir / "summary.md", summary)
        logger.info("wrote %s", out_dir)
        return summary


register_scenario_kind(ScenarioKind(
    name="distill-compare", schema=CompareScenario, run=run_compare,
    summary="compare distillers at several IPCs under one evaluation protocol"))
