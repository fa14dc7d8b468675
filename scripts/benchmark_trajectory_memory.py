"""Peak memory of one trajectory-matching iteration against the number of unrolled steps.

`mtt` keeps the whole unrolled graph, so its peak grows with syn_steps; `tesla` recomputes
one step at a time, so its peak stays flat. For each (method, syn_steps) the script runs one
iteration on random CIFAR-shaped images with a random "expert" pair and prints the measured
peak beside the estimate that the distillers check before a run.

Measurement: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the
iteration; on the CPU, the peak resident set size of a fresh child process (one per
measurement) above its size just before the iteration.

    python scripts/benchmark_trajectory_memory.py                       # CPU, 5..40 steps
    python scripts/benchmark_trajectory_memory.py --device cuda --steps 10,20,40,80
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from ddsuite.core.augment import DiffAugment
from ddsuite.core.methods.trajectory import (
    StudentModel,
    draw_unroll,
    estimate_step_memory,
    measure_activation_bytes,
    recomputed_matching_gradients,
    unrolled_matching_loss,
)
from ddsuite.core.models import build_model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace, method: str, syn_steps: int) -> dict:
    """One iteration of `method`; returns measured and estimated peak bytes."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.channels, args.image_size, args.image_size)
    n = args.classes * args.ipc
    net = build_model(args.model, in_channels=args.channels, num_classes=args.classes,
                      image_size=shape[1:], device=device)
    student = StudentModel(net)
    theta_start = torch.cat([p.detach().flatten() for p in net.parameters()])
    theta_target = theta_start + 0.01 * torch.randn_like(theta_start)
    images = torch.randn(n, *shape, device=device, requires_grad=True)
    labels = torch.arange(args.classes, device=device).repeat_interleave(args.ipc)
    log_step = torch.tensor(-4.6, device=device, requires_grad=True)
    augment = DiffAugment("crop_scale_rotate")
    draws = draw_unroll(n, syn_steps=syn_steps, batch_syn=args.batch_syn or n, augment=augment,
                        generator=torch.Generator().manual_seed(0), device=device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_bytes()
    start = time.perf_counter()
    if method == "mtt":
        loss = unrolled_matching_loss(student, images, labels, log_step.exp(), theta_start,
                                      theta_target, draws=draws, augment=augment)
        loss.backward()
    else:
        recomputed_matching_gradients(student, images, labels, log_step.exp(), theta_start,
                                      theta_target, draws=draws, augment=augment,
                                      snapshot_device="cpu" if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - start

    estimate = estimate_step_memory(
        method=method, num_params=student.num_params,
        activation_bytes=measure_activation_bytes(args.model, image_shape=shape,
                                                  num_classes=args.classes),
        batch_syn=args.batch_syn or n, syn_steps=syn_steps, num_images=n,
        image_numel=images[0].numel(), snapshots_on_device=device.type != "cuda")
    return {"method": method, "syn_steps": syn_steps, "peak": peak,
            "estimate": estimate.total, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", default="5,10,20,40", help="syn_steps values, comma-separated")
    parser.add_argument("--methods", default="mtt,tesla")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-syn", type=int, default=None, help="default: the whole set")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child is not None:  # one CPU measurement in a fresh process
        method, steps = args.child.split(":")
        print(json.dumps(measure(args, method, int(steps))))
        return

    rows = []
    for method in args.methods.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            if torch.device(args.device).type == "cuda":
                rows.append(measure(args, method, steps))
            else:
                argv = [a for a in sys.argv[1:] if not a.startswith("--child")]
                out = subprocess.run([sys.executable, __file__, *argv,
                                      f"--child={method}:{steps}"],
                                     check=True, capture_output=True, text=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{row['method']:6s} syn_steps {row['syn_steps']:4d}  peak "
                  f"{row['peak'] / 2**20:9.1f} MiB  estimate {row['estimate'] / 2**20:9.1f} MiB"
                  f"  ({row['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
