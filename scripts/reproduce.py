"""Reproduce the DC/DSA/DM table on MNIST (ConvNet, IPC 1 and 10) and print ours beside theirs.

Published (ConvNet-3, MNIST, test accuracy %, IPC 1 / 10), from the DC, DSA and DM papers:
random 64.9 / 95.1, herding 89.2 / 93.7, DC 91.7 / 97.4, DSA 88.7 / 97.8, DM 89.7 / 97.5;
whole training set 99.6.

Budgets:
  cpu    fits in under an hour on 2 CPU cores: far fewer iterations, smaller real batches,
         fewer evaluation networks and epochs than the papers. Its numbers are NOT the
         published protocol; they show how far a CPU budget gets.
  paper  the published iteration counts, real batch sizes and evaluation protocol (5
         networks; 300 epochs, 1,000 with augmentation for DSA and DM). Needs a GPU.

Usage:
  python scripts/reproduce_mnist.py --data-root ../shared/data --budget cpu --out runs/repro
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ddsuite.core.atomic import write_json, write_text
from ddsuite.core.data import load_dataset
from ddsuite.core.device import resolve_device
from ddsuite.core.engine import FinalEvaluation, ProgressBar, distill
from ddsuite.core.methods import get_method
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import format_mean_std, markdown_table

PUBLISHED = {
    ("random", 1): 64.9, ("random", 10): 95.1,
    ("herding", 1): 89.2, ("herding", 10): 93.7,
    ("dc", 1): 91.7, ("dc", 10): 97.4,
    ("dsa", 1): 88.7, ("dsa", 10): 97.8,
    ("dm", 1): 89.7, ("dm", 10): 97.5,
}
WHOLE_SET = 99.6
METHODS = ("random", "herding", "dc", "dsa", "dm")

# Per-budget method options, keyed by (method, ipc); "*" applies to every IPC.
BUDGETS = {
    "cpu": {
        "options": {
            ("herding", "*"): {"feature_steps": 50},
            ("dc", 1): {"iterations": 50, "batch_real": 32},
            ("dc", 10): {"iterations": 5, "batch_real": 32, "inner_loop": 5},
            ("dsa", 1): {"iterations": 50, "batch_real": 32},
            ("dsa", 10): {"iterations": 5, "batch_real": 32, "inner_loop": 5},
            ("dm", 1): {"iterations": 100, "batch_real": 32},
            ("dm", 10): {"iterations": 100, "batch_real": 32},
        },
        "num_eval": 3,
        "epochs": 100,
    },
    "paper": {"options": {}, "num_eval": 5, "epochs": None},
}


def _options(budget: str, method: str, ipc: int) -> dict:
    table = BUDGETS[budget]["options"]
    return {**table.get((method, "*"), {}), **table.get((method, ipc), {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default="../shared/data", help="folder with MNIST/raw")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--ipc", default="1,10", help="comma-separated IPCs (default 1,10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/reproduce-mnist", help="report folder")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    ipcs = [int(v) for v in args.ipc.split(",")]
    device = resolve_device(args.device)
    budget = BUDGETS[args.budget]
    out = Path(args.out)
    splits = load_dataset("mnist", data_root=args.data_root, device=device)

    rows, records = [], []
    for ipc in ipcs:
        for method in methods:
            options = {**_options(args.budget, method, ipc), "ipc": ipc}
            config = get_method(method).Config(**options).resolve(dataset="mnist")
            protocol = get_method(method).eval_protocol(config).with_overrides(
                num_eval=budget["num_eval"], epochs=budget["epochs"])
            label = f"{method}-ipc{ipc}"
            start = time.perf_counter()
            result = distill(method, splits=splits, config=config, seed=args.seed,
                             device=device, out_dir=out / "sets" / label, overwrite=True,
                             protocol=protocol, checkpoint_every=0,
                             callbacks=[ProgressBar(label), FinalEvaluation(protocol)])
            score = result.metrics["evaluation"]["scores"][protocol.models[0]]
            wall = time.perf_counter() - start
            published = PUBLISHED.get((method, ipc))
            gap = score["mean"] - published if published is not None else float("nan")
            rows.append([method, ipc, format_mean_std(score["mean"], score["std"]),
                         f"{published:.1f}" if published is not None else "-", f"{gap:+.1f}",
                         config.iterations if get_method(method).iterative else "-",
                         f"{protocol.resolved_epochs} / {protocol.augmentation}",
                         f"{result.seconds:.0f}", f"{wall:.0f}"])
            records.append({"method": method, "ipc": ipc, "ours": score,
                            "published": published, "config": config.to_dict(),
                            "protocol": protocol.to_dict(), "distill_seconds": result.seconds,
                            "wall_seconds": wall})
            print(f"{label}: {format_mean_std(score['mean'], score['std'])} "
                  f"(published {published}) in {wall:.0f}s", flush=True)

    headers = ["method", "IPC", "ours", "published", "gap", "iterations",
               "eval epochs / aug", "distill s", "total s"]
    table = markdown_table(headers, rows)
    text = (f"# MNIST reproduction, budget {args.budget}\n\n"
            f"ConvNet-3, test accuracy %, mean ± std over {budget['num_eval']} networks; "
            f"whole training set (published): {WHOLE_SET}. Device {device}.\n\n{table}\n")
    print()
    print(text)
    write_text(out / "summary.md", text)
    write_json(out / "metrics.json", {
        "budget": args.budget, "created": timestamp(), "device": str(device),
        "dataset": splits.identity.to_dict(), "versions": library_versions(),
        "whole_set_published": WHOLE_SET, "results": records,
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
