"""Benchmark the core: distillation iterations per second, peak memory, evaluation throughput.

Each measurement runs in its own subprocess, so the peak memory reported is that method's
alone (peak resident set size on the CPU; peak allocated CUDA memory on a GPU).

Usage:
  python scripts/benchmark.py                              # digits, every method, CPU/GPU auto
  python scripts/benchmark.py --dataset mnist --data-root ../shared/data --ipc 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ddsuite.core.data import load_dataset
from ddsuite.core.device import resolve_device
from ddsuite.core.engine import distill
from ddsuite.core.evaluation import EvaluationProtocol, train_networks
from ddsuite.core.methods import get_method, list_methods
from ddsuite.core.report import markdown_table

# Cheap per-method settings so one measurement takes seconds, not hours.
OPTIONS = {
    "herding": {"feature_steps": 20},
    "k-center": {"feature_steps": 20},
    "dc": {"inner_loop": 5},
    "dsa": {"inner_loop": 5},
}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure_method(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    splits = load_dataset(args.dataset, data_root=args.data_root, device=device)
    iterative = get_method(args.one).iterative
    options = {**OPTIONS.get(args.one, {}), "ipc": args.ipc,
               "iterations": args.iterations if iterative else 0}
    distill(args.one, splits=splits, config={**options, "iterations": 1 if iterative else 0},
            device=device, seed=0)  # warm-up
    start = time.perf_counter()
    distill(args.one, splits=splits, config=options, device=device, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"method": args.one, "ipc": args.ipc, "iterations": options["iterations"],
            "seconds": seconds,
            "iterations_per_second": options["iterations"] / seconds if iterative else None,
            "peak_memory_mb": _peak_memory_mb(device), "device": str(device)}


def measure_evaluation(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    splits = load_dataset(args.dataset, data_root=args.data_root, device=device)
    images = splits.train.sample_per_class(args.ipc, generator=torch.Generator().manual_seed(0))
    images = images.flatten(0, 1)
    labels = torch.arange(splits.train.num_classes).repeat_interleave(args.ipc).to(device)
    protocol = EvaluationProtocol(num_eval=args.num_eval, epochs=args.eval_epochs)
    out = []
    for mode in ("loop", "vmap"):
        train_networks(images, labels, model="convnet", num_classes=splits.train.num_classes,
                       protocol=protocol.with_overrides(epochs=1), device=device, mode=mode)
        start = time.perf_counter()
        train_networks(images, labels, model="convnet", num_classes=splits.train.num_classes,
                       protocol=protocol, device=device, mode=mode)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        out.append({"mode": mode, "networks": args.num_eval, "epochs": args.eval_epochs,
                    "images": images.shape[0], "seconds": seconds,
                    "networks_per_minute": 60 * args.num_eval / seconds,
                    "device": str(device)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--data-root")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--methods", default=",".join(list_methods()))
    parser.add_argument("--num-eval", type=int, default=5)
    parser.add_argument("--eval-epochs", type=int, default=20)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--evaluation-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(measure_method(args)))
        return 0
    if args.evaluation_only:
        print(json.dumps(measure_evaluation(args)))
        return 0

    common = [f"--dataset={args.dataset}", f"--device={args.device}", f"--ipc={args.ipc}",
              f"--iterations={args.iterations}", f"--num-eval={args.num_eval}",
              f"--eval-epochs={args.eval_epochs}"]
    if args.data_root:
        common.append(f"--data-root={args.data_root}")

    def child(extra: list[str]) -> str:
        done = subprocess.run([sys.executable, __file__, *common, *extra], check=True,
                              capture_output=True, text=True)
        return done.stdout.strip().splitlines()[-1]

    rows = []
    for method in args.methods.split(","):
        r = json.loads(child([f"--one={method}"]))
        rate = r["iterations_per_second"]
        rows.append([method, r["ipc"], r["iterations"],
                     f"{rate:.3f}" if rate is not None else "one-shot",
                     f"{r['seconds']:.1f}", f"{r['peak_memory_mb']:.0f}"])
        print(f"{method}: {rows[-1]}", flush=True)
    evaluation = json.loads(child(["--evaluation-only"]))

    print(f"\n# Distillation on {args.dataset}, ipc {args.ipc}, device {evaluation[0]['device']}\n")
    print(markdown_table(["method", "ipc", "iterations", "iterations/s", "seconds",
                          "peak memory MB"], rows))
    print(f"\n# Evaluation throughput ({args.num_eval} ConvNet-3, {args.eval_epochs} epochs, "
          f"{evaluation[0]['images']} images)\n")
    print(markdown_table(["mode", "seconds", "networks per minute"],
                         [[e["mode"], f"{e['seconds']:.1f}", f"{e['networks_per_minute']:.1f}"]
                          for e in evaluation]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
