"""Reproduce published DD tables (ConvNet-3) on MNIST or the CIFAR-10 JPEG copy, and print
ours beside theirs.

Published test accuracy (%), ConvNet-3:
  MNIST, IPC 1 / 10 (DC, DSA and DM papers): random 64.9 / 95.1, herding 89.2 / 93.7,
    DC 91.7 / 97.4, DSA 88.7 / 97.8, DM 89.7 / 97.5; whole training set 99.6.
  CIFAR-10, IPC 1 / 10 / 50: random 14.4 / 26.0 / 43.4, herding 21.5 / 31.6 / 40.4,
    DC 28.3 / 44.9 / 53.9, DSA 28.8 / 52.1 / 60.6, DM 26.0 / 48.9 / 63.0,
    CAFE 30.3 / 46.3 / 55.5, MTT 46.3 / 65.3 / 71.6, TESLA 48.5 / 66.4 / 72.6,
    FRePo 46.8 / 65.5 / 71.7, KIP 49.9 / 62.7 / 68.6, IDC 50.0 / 67.5 / 74.5,
    HaBa 48.3 / 69.9 / 74.0; whole training set 84.8.
Methods without a published number for a dataset print "-" there.

Budgets:
  cpu    fits a CPU: far fewer iterations, smaller real batches and fewer experts than the
         papers, and 3 evaluation networks (trained for the published epochs). Its numbers
         are NOT the published protocol; they show how far a CPU budget gets.
  paper  the published iteration counts, real batch sizes and evaluation protocol (5
         networks; 300 epochs, 1,000 with augmentation). Needs a GPU.

The CIFAR-10 copy is JPEG-compressed (quality about 75), so its accuracies run a little below
the published ones; extract it first:
  mkdir -p data/cifar10-jpeg && tar xzf ../shared/data/cifar10-jpeg.tar.gz -C data/cifar10-jpeg

Usage:
  python scripts/reproduce.py --dataset mnist --data-root ../shared/data --budget cpu
  python scripts/reproduce.py --dataset cifar10 --cifar10-root data/cifar10-jpeg \\
      --methods random,dm,idc --ipc 1,10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ddsuite.core.atomic import write_json, write_text
from ddsuite.core.data import load_dataset
from ddsuite.core.device import resolve_device
from ddsuite.core.engine import FinalEvaluation, ProgressBar, distill
from ddsuite.core.evaluation import evaluate_images
from ddsuite.core.methods import get_method
from ddsuite.core.provenance import library_versions, timestamp
from ddsuite.core.report import format_mean_std, markdown_table
from ddsuite.core.synthetic import is_artifact
from ddsuite.scenarios import apply_overrides

MNIST = {
    ("random", 1): 64.9, ("random", 10): 95.1,
    ("herding", 1): 89.2, ("herding", 10): 93.7,
    ("dc", 1): 91.7, ("dc", 10): 97.4,
    ("dsa", 1): 88.7, ("dsa", 10): 97.8,
    ("dm", 1): 89.7, ("dm", 10): 97.5,
}
CIFAR10 = {
    **{("random", i): v for i, v in zip((1, 10, 50), (14.4, 26.0, 43.4))},
    **{("herding", i): v for i, v in zip((1, 10, 50), (21.5, 31.6, 40.4))},
    **{("dc", i): v for i, v in zip((1, 10, 50), (28.3, 44.9, 53.9))},
    **{("dsa", i): v for i, v in zip((1, 10, 50), (28.8, 52.1, 60.6))},
    **{("dm", i): v for i, v in zip((1, 10, 50), (26.0, 48.9, 63.0))},
    **{("cafe", i): v for i, v in zip((1, 10, 50), (30.3, 46.3, 55.5))},
    **{("mtt", i): v for i, v in zip((1, 10, 50), (46.3, 65.3, 71.6))},
    **{("tesla", i): v for i, v in zip((1, 10, 50), (48.5, 66.4, 72.6))},
    **{("frepo", i): v for i, v in zip((1, 10, 50), (46.8, 65.5, 71.7))},
    **{("kip", i): v for i, v in zip((1, 10, 50), (49.9, 62.7, 68.6))},
    **{("idc", i): v for i, v in zip((1, 10, 50), (50.0, 67.5, 74.5))},
    **{("haba", i): v for i, v in zip((1, 10, 50), (48.3, 69.9, 74.0))},
}
DATASETS = {"mnist": {"published": MNIST, "whole_set": 99.6, "ipcs": "1,10"},
            "cifar10": {"published": CIFAR10, "whole_set": 84.8, "ipcs": "1,10,50"}}
# Methods whose published CIFAR-10 numbers were distilled and evaluated on ZCA-whitened
# images (MTT, TESLA, HaBa, KIP, RFAD, FRePo); on CIFAR-10 they get the same input space.
ZCA_ON_CIFAR10 = frozenset({"mtt", "tesla", "haba", "kip", "rfad", "frepo"})
METHODS = ("random", "herding", "dc", "dsa", "dm", "cafe", "idm", "datadam", "mtt", "tesla",
           "kip", "rfad", "frepo", "dd", "sre2l", "idc", "haba")

# One expert of 6 epochs (the cache is shared by mtt, tesla and haba at every IPC).
TRAJECTORY_CPU = {"iterations": 100, "num_experts": 1, "expert_epochs_train": 6,
                  "syn_steps": 10, "expert_epochs": 2, "max_start_epoch": 4}

# Per-budget method options, keyed by (method, ipc); "*" applies to every IPC. The cpu
# budget's counts are what one CPU core gets through in minutes per method and IPC.
BUDGETS = {
    "cpu": {
        "options": {
            ("herding", "*"): {"feature_steps": 50},
            ("dc", 1): {"iterations": 50, "batch_real": 32},
            ("dc", 10): {"iterations": 5, "batch_real": 32, "inner_loop": 5},
            ("dsa", 1): {"iterations": 50, "batch_real": 32},
            ("dsa", 10): {"iterations": 5, "batch_real": 32, "inner_loop": 5},
            ("dm", "*"): {"iterations": 100, "batch_real": 32},
            ("cafe", "*"): {"iterations": 20, "batch_real": 32},
            ("idm", "*"): {"iterations": 50, "batch_real": 32, "pool_size": 10,
                           "train_steps": 5, "batch_train": 64},
            ("datadam", "*"): {"iterations": 100, "batch_real": 32},
            ("mtt", "*"): TRAJECTORY_CPU,
            ("tesla", "*"): TRAJECTORY_CPU,
            ("haba", "*"): TRAJECTORY_CPU,
            ("kip", "*"): {"iterations": 100},
            ("rfad", "*"): {"iterations": 50, "num_models": 2, "batch_real": 16},
            ("frepo", "*"): {"iterations": 100},
            ("dd", "*"): {"iterations": 50},
            ("sre2l", "*"): {"iterations": 200, "squeeze_steps": 500},
            ("idc", "*"): {"iterations": 10, "inner_loop": 5, "n_data": 500},
        },
        "num_eval": 3,
        "epochs": None,  # the published epochs: cheap next to distilling at IPC 1-10
    },
    "paper": {"options": {}, "num_eval": 5, "epochs": None},
}


def _options(budget: str, method: str, ipc: int) -> dict:
    table = BUDGETS[budget]["options"]
    return {**table.get((method, "*"), {}), **table.get((method, ipc), {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    parser.add_argument("--data-root", default="../shared/data", help="folder with MNIST/raw")
    parser.add_argument("--cifar10-root", default="data/cifar10-jpeg",
                        help="the extracted CIFAR-10 JPEG copy (train/ and test/ inside)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--ipc", default=None,
                        help="comma-separated IPCs (default: 1,10 on MNIST, 1,10,50 on CIFAR-10)")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="override one method option of the budget, e.g. "
                             "mtt.expert_epochs_train=3 (repeatable; recorded in metrics.json)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="re-evaluate the sets already in --out/sets (made by an earlier "
                             "run with the same options) under this budget's protocol")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None,
                        help="report folder (default runs/reproduce-DATASET)")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; allowed: {', '.join(METHODS)}")
    overrides: dict[str, dict] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        method, dot, option = key.partition(".")
        if not sep or not dot or method not in methods:
            parser.error(f"--set {item!r}: expected METHOD.KEY=VALUE with METHOD one of "
                         f"{', '.join(methods)}")
        overrides.setdefault(method, {}).update(apply_overrides({}, [f"{option}={value}"]))
    table = DATASETS[args.dataset]
    ipcs = [int(v) for v in (args.ipc or table["ipcs"]).split(",")]
    device = resolve_device(args.device)
    budget = BUDGETS[args.budget]
    out = Path(args.out or f"runs/reproduce-{args.dataset}")
    if args.dataset == "mnist":
        splits = load_dataset("mnist", data_root=args.data_root, device=device)
    else:
        root = Path(args.cifar10_root)
        if not (root / "train").is_dir() or not (root / "test").is_dir():
            parser.error(f"--cifar10-root {root} lacks train/ and test/; extract the copy: "
                         f"mkdir -p {root} && tar xzf ../shared/data/cifar10-jpeg.tar.gz "
                         f"-C {root}")
        splits = load_dataset(f"imagefolder:{root}", device=device, cache_dir=out / "cache")
    whitened = None
    if args.dataset == "cifar10" and ZCA_ON_CIFAR10 & set(methods):
        whitened = load_dataset(f"imagefolder:{root}", device=device, cache_dir=out / "cache",
                                zca=True)
    dataset = args.dataset

    rows, records = [], []
    for ipc in ipcs:
        for method in methods:
            options = {**_options(args.budget, method, ipc), **overrides.get(method, {}),
                       "ipc": ipc}
            config = get_method(method).Config(**options).resolve(dataset=dataset)
            protocol = get_method(method).eval_protocol(config).with_overrides(
                num_eval=budget["num_eval"], epochs=budget["epochs"])
            label = f"{method}-ipc{ipc}"
            start = time.perf_counter()
            zca = whitened is not None and method in ZCA_ON_CIFAR10
            inputs = whitened if zca else splits
            if args.evaluate_only:
                if not is_artifact(out / "sets" / label):
                    parser.error(f"--evaluate-only: no set at {out / 'sets' / label}")
                # The finished run is returned as it is (refused if its options differ).
                result = distill(method, splits=inputs, config=config, seed=args.seed,
                                 device=device, out_dir=out / "sets" / label, resume=True)
                protocol = dataclasses.replace(result.protocol, num_eval=budget["num_eval"],
                                               epochs=budget["epochs"])
                images, labels, soft = result.syn.decoded()
                evaluation = evaluate_images(
                    images, labels, inputs, protocol=protocol, device=device, seed=args.seed,
                    labels_soft=None if protocol.label_loss == "cross_entropy" else soft)
                score = evaluation.to_dict()["scores"][protocol.models[0]]
            else:
                result = distill(method, splits=inputs, config=config, seed=args.seed,
                                 device=device, out_dir=out / "sets" / label, overwrite=True,
                                 protocol=protocol, checkpoint_every=0,
                                 callbacks=[ProgressBar(label), FinalEvaluation(protocol)])
                score = result.metrics["evaluation"]["scores"][protocol.models[0]]
            wall = time.perf_counter() - start
            published = table["published"].get((method, ipc))
            gap = score["mean"] - published if published is not None else float("nan")
            rows.append([method, ipc, format_mean_std(score["mean"], score["std"]),
                         f"{published:.1f}" if published is not None else "-", f"{gap:+.1f}",
                         config.iterations if get_method(method).iterative else "-",
                         f"{protocol.resolved_epochs} / {protocol.augmentation}"
                         + (" / zca" if zca else ""),
                         f"{result.seconds:.0f}", f"{wall:.0f}"])
            records.append({"method": method, "ipc": ipc, "ours": score,
                            "published": published, "config": config.to_dict(),
                            "protocol": protocol.to_dict(), "zca": zca,
                            "distill_seconds": result.seconds,
                            "wall_seconds": wall})
            print(f"{label}: {format_mean_std(score['mean'], score['std'])} "
                  f"(published {published}) in {wall:.0f}s", flush=True)

    headers = ["method", "IPC", "ours", "published", "gap", "iterations",
               "eval epochs / aug / input", "distill s", "total s"]
    text = (f"# {dataset} reproduction, budget {args.budget}\n\n"
            f"ConvNet-3, test accuracy %, mean ± std over {budget['num_eval']} networks; "
            f"whole training set (published): {table['whole_set']}. Device {device}.\n\n"
            f"{markdown_table(headers, rows)}\n")
    print()
    print(text)
    write_text(out / "summary.md", text)
    write_json(out / "metrics.json", {
        "budget": args.budget, "created": timestamp(), "device": str(device),
        "dataset": splits.identity.to_dict(), "versions": library_versions(),
        "whole_set_published": table["whole_set"], "results": records,
        "command": " ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
