"""The `ddsuite` command: distill, evaluate, run scenarios, list what is registered."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from ddsuite.core.errors import DDSuiteError

__all__ = ["main"]

EPILOG_DISTILL = """examples:
  ddsuite distill --dataset digits --method dm --ipc 10 --out runs/dm-digits
  ddsuite distill --dataset mnist --data-root ../shared/data --method dc --ipc 1 \\
      --iterations 200 --set batch_real=64 --out runs/dc-mnist
"""


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddsuite",
        description="Dataset distillation and its applications: make a tiny synthetic "
                    "training set, judge it under one protocol, run scenarios end to end.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # -- distill ---------------------------------------------------------------------------
    d = sub.add_parser("distill", help="distil a dataset into a synthetic set",
                       epilog=EPILOG_DISTILL, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distil a dataset with a registered method and write a run "
                                   "folder: artifact (synthetic.safetensors + artifact.json), "
                                   "run.json, metrics.json, summary.md and grid.png.")
    d.add_argument("--dataset", default="digits",
                   help="dataset name (see `ddsuite list datasets`); default: digits")
    d.add_argument("--data-root", help="folder holding torchvision datasets")
    d.add_argument("--download", action="store_true",
                   help="let torchvision download the dataset into --data-root")
    d.add_argument("--zca", action="store_true", help="ZCA-whiten the inputs (fit on train)")
    d.add_argument("--method", required=True, help="method name (see `ddsuite list methods`)")
    d.add_argument("--ipc", type=int, required=True, help="images per class")
    d.add_argument("--iterations", type=int, help="outer iterations (default: published)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --set lr_images=0.5 (repeatable; see "
                        "`ddsuite list methods -v`)")
    d.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    d.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    d.add_argument("--out", required=True, help="run folder to write")
    d.add_argument("--resume", action="store_true", help="continue the run in --out")
    d.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    d.add_argument("--checkpoint-every", type=_non_negative, default=50,
                   help="iterations between checkpoints (default 50; 0: none)")
    d.add_argument("--eval-every", type=_non_negative, default=0,
                   help="evaluate every N iterations (default 0: only at the end)")
    d.add_argument("--grid-every", type=_non_negative, default=0,
                   help="write an image grid every N iterations (default: only at the end)")
    d.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    _add_protocol_options(d)
    d.add_argument("--tensorboard", action="store_true",
                   help="log to OUT/tensorboard (needs the tensorboard extra)")
    d.set_defaults(func=_cmd_distill)

    # -- evaluate --------------------------------------------------------------------------
    e = sub.add_parser("evaluate", help="evaluate a distilled set (a run or artifact folder)",
                       description="Train fresh networks on a saved set and test them on the "
                                   "real test split. The protocol defaults to the one stored "
                                   "with the set; options below override it, and the "
                                   "protocol used is written with the result.")
    e.add_argument("artifact", help="a run folder or artifact folder")
    e.add_argument("--data-root", help="folder holding torchvision datasets")
    e.add_argument("--download", action="store_true", help="allow torchvision downloads")
    e.add_argument("--seed", type=int, default=0, help="evaluation seed (default 0)")
    e.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    _add_protocol_options(e)
    e.set_defaults(func=_cmd_evaluate)

    # -- run -------------------------------------------------------------------------------
    r = sub.add_parser("run", help="run a scenario (a shipped name or a YAML path)",
                       description="Run a scenario end to end and write its report folder "
                                   "(scenario.yaml, metrics.json, summary.md, sets/).")
    r.add_argument("scenario", help="scenario name (see `ddsuite list scenarios`) or path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario value, e.g. --set evaluation.num_eval=3")
    r.add_argument("--out", help="report folder (default: runs/NAME-TIMESTAMP)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    r.add_argument("--device", help="override the scenario's device")
    r.set_defaults(func=_cmd_run)

    # -- list ------------------------------------------------------------------------------
    ls = sub.add_parser("list", help="list datasets, models, methods or scenarios")
    ls.add_argument("what", nargs="?", default="all",
                    choices=["all", "datasets", "models", "methods", "scenarios"])
    ls.add_argument("-v", "--verbose", dest="details", action="store_true",
                    help="show each method's options")
    ls.set_defaults(func=_cmd_list)
    return parser


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation protocol (overrides)")
    g.add_argument("--models", help="comma-separated model specs, e.g. convnet,mlp")
    g.add_argument("--num-eval", type=int, help="networks trained per model")
    g.add_argument("--eval-epochs", type=int, help="training epochs of each network")
    g.add_argument("--eval-augmentation", help="'none' or an augmentation strategy")


def _protocol_overrides(args: argparse.Namespace) -> dict:
    from ddsuite.core.models import split_model_list

    return {
        "models": tuple(split_model_list(args.models)) if args.models else None,
        "num_eval": args.num_eval,
        "epochs": args.eval_epochs,
        "augmentation": args.eval_augmentation,
    }


def _parse_sets(items: Sequence[str]) -> dict:
    from ddsuite.core.errors import ConfigError
    from ddsuite.scenarios import apply_overrides

    for item in items:
        if "." in item.partition("=")[0]:
            raise ConfigError([f"--set {item!r}: method options have no dots"])
    return apply_overrides({}, items)


def _cmd_distill(args: argparse.Namespace) -> int:
    from ddsuite.core.errors import ConfigError
    from ddsuite.core.data import load_dataset
    from ddsuite.core.device import resolve_device
    from ddsuite.core.engine import (FinalEvaluation, ImageGrid, LogMetrics, PeriodicEvaluation,
                                     ProgressBar, TensorBoardLogger, distill, resolve_config)
    from ddsuite.core.methods import get_method
    from ddsuite.core.report import format_mean_std

    device = resolve_device(args.device)
    options = _parse_sets(args.set)
    for key, value in (("ipc", args.ipc), ("iterations", args.iterations)):
        if key in options and value is not None:
            raise ConfigError([f"{key} given twice: --{key} {value} and --set {key}="
                               f"{options[key]}; give it once"])
        if value is not None:
            options[key] = value
    config = resolve_config(args.method, options, dataset=args.dataset)  # fail before loading
    splits = load_dataset(args.dataset, data_root=args.data_root, device=device, zca=args.zca,
                          download=args.download)
    out = Path(args.out)
    protocol = get_method(args.method).eval_protocol(config)
    protocol = protocol.with_overrides(**_protocol_overrides(args))
    callbacks = [ProgressBar(f"{args.method} ipc {args.ipc}"), LogMetrics(every=100),
                 ImageGrid(out, every=args.grid_every)]
    if args.eval_every:
        callbacks.append(PeriodicEvaluation(args.eval_every, protocol.with_overrides(num_eval=1)))
    if args.tensorboard:
        callbacks.append(TensorBoardLogger(out / "tensorboard"))
    if not args.no_eval:
        callbacks.append(FinalEvaluation(protocol))
    result = distill(args.method, splits=splits, config=config, seed=args.seed, device=device,
                     out_dir=out, callbacks=callbacks, checkpoint_every=args.checkpoint_every,
                     resume=args.resume, overwrite=args.overwrite, protocol=protocol)
    print(f"distilled {args.dataset} with {args.method} at ipc {args.ipc} in "
          f"{result.seconds:.1f}s -> {out}")
    storage = _storage(out)
    if storage["decode"] is not None:
        print(f"  stores {storage['size_bytes']} bytes ({storage['storage_ipc']} images per "
              f"class) that decode to {storage['decoded_ipc']} images per class")
    provenance = {
        "method": args.method, "config": result.config.to_dict(), "seed": args.seed,
        "dataset": splits.identity.to_dict(), "input_space": splits.input_space.to_dict(),
        "distill_seconds": result.seconds, "artifact": str(out), "storage": storage,
        **result.meta,
    }
    _write_evaluation_report(out, result.metrics.get("evaluation"), provenance=provenance)
    for model, score in result.metrics.get("evaluation", {}).get("scores", {}).items():
        print(f"  {model}: {format_mean_std(score['mean'], score['std'], 2)} % "
              f"({len(score['accuracies'])} networks)")
    return 0


def _storage(folder: Path) -> dict:
    """What the artifact in `folder` stores and what it decodes to (its artifact.json)."""
    from ddsuite.core.synthetic import META_FILE

    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return {key: meta.get(key) for key in ("ipc", "decode", "decoded_ipc", "size_bytes",
                                           "storage_ipc")}


_PROVENANCE_KEYS = ("method", "config", "seed", "dataset", "input_space", "distill_seconds",
                    "artifact", "storage")


def _brief(value) -> str:
    """A one-line view of extra provenance (a private run's budget, say): its scalar fields."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in value.items() if isinstance(v, (int, float, str)))
    return str(value)


def _write_evaluation_report(folder: Path, evaluation: dict | None, *,
                             provenance: dict) -> None:
    """metrics.json and summary.md of a distill run; each stands on its own. Without an
    evaluation (--no-eval) they hold the provenance and say how to evaluate."""
    from ddsuite.core.atomic import write_json, write_text
    from ddsuite.core.provenance import library_versions
    from ddsuite.core.report import format_mean_std, markdown_table

    config, dataset, storage = provenance["config"], provenance["dataset"], provenance["storage"]
    lines = [
        f"# {provenance['method']} on {dataset['name']}, ipc {config['ipc']}\n\n"
        f"- set: {provenance['artifact']} (seed {provenance['seed']}, "
        f"{config.get('iterations') or 0} iterations, {provenance['distill_seconds']:.0f}s)\n",
        f"- dataset: {dataset['source']}, {dataset['num_train']} train / {dataset['num_test']} "
        f"test, fingerprint {dataset['fingerprint'][:16]}\n",
        f"- storage: {storage['size_bytes']} bytes ({storage['storage_ipc']} images per class),"
        f" decoding to {storage['decoded_ipc']} images per class"
        + (f" ({storage['decode']['kind']})" if storage["decode"] else "") + "\n",
    ]
    lines += [f"- {key}: {_brief(provenance[key])}\n" for key in provenance
              if key not in _PROVENANCE_KEYS]
    if evaluation is None:
        versions = ", ".join(f"{k} {v}" for k, v in library_versions().items())
        lines.append(f"- {versions}\n\nNot evaluated (--no-eval); run `ddsuite evaluate "
                     f"{shlex.quote(provenance['artifact'])}`.\n")
    else:
        protocol = evaluation["protocol"]
        rows = [[m, format_mean_std(s["mean"], s["std"], 2), len(s["accuracies"])]
                for m, s in evaluation["scores"].items()]
        versions = ", ".join(f"{k} {v}" for k, v in evaluation["versions"].items())
        lines += [
            f"- protocol {protocol['name']}: {protocol['resolved_epochs']} epochs, "
            f"lr {protocol['lr']}, batch {protocol['batch_size']}, augmentation "
            f"{protocol['augmentation']}, labels {evaluation['labels']}, seed "
            f"{evaluation['seed']}\n",
            f"- created {evaluation['created']}; {versions}\n\n",
            "Test accuracy (%) after the final epoch, mean ± std over networks:\n\n",
            markdown_table(["model", "accuracy", "networks"], rows) + "\n",
        ]
    text = "".join(lines)
    write_json(folder / "metrics.json", {**provenance, "evaluation": evaluation})
    write_text(folder / "summary.md", text)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ddsuite.core.atomic import write_json
    from ddsuite.core.data import load_dataset
    from ddsuite.core.device import resolve_device
    from ddsuite.core.evaluation import EvaluationProtocol, check_input_space, evaluate_images
    from ddsuite.core.report import format_mean_std
    from ddsuite.core.synthetic import META_FILE, TENSORS_FILE, load_artifact, update_metrics

    device = resolve_device(args.device)
    folder = Path(args.artifact)
    if folder.is_file() and folder.name in (META_FILE, TENSORS_FILE):
        folder = folder.parent  # the user pointed at a file of the artifact
    artifact = load_artifact(folder, device=device)
    made_on = artifact.meta["dataset"]
    zca = artifact.meta["input_space"].get("zca") is not None
    splits = load_dataset(made_on["name"], data_root=args.data_root, device=device, zca=zca,
                          zca_epsilon=(artifact.meta["input_space"]["zca"] or {}).get(
                              "epsilon", 0.1),
                          download=args.download)
    check_input_space(artifact.meta, splits)
    protocol = EvaluationProtocol.from_dict(artifact.meta["protocol"])
    protocol = protocol.with_overrides(**_protocol_overrides(args))
    images, labels, labels_soft = artifact.decoded()
    result = evaluate_images(images, labels, splits, protocol=protocol,
                             device=device, seed=args.seed, labels_soft=labels_soft)
    record = result.to_dict()
    previous = artifact.meta.get("metrics", {}).get("evaluations", [])
    number = len(previous) + 1
    while (folder / "evaluations" / f"evaluation-{number:03d}.json").exists():
        number += 1
    write_json(folder / "evaluations" / f"evaluation-{number:03d}.json", record)
    update_metrics(folder, {"evaluations": previous + [record]})
    print(f"{artifact.method} set, ipc {artifact.ipc}, on {made_on['name']} "
          f"(protocol {protocol.name}, {protocol.resolved_epochs} epochs):")
    for model, score in result.scores.items():
        print(f"  {model}: {format_mean_std(score.mean, score.std, 2)} % "
              f"({len(score.accuracies)} networks, {score.seconds:.0f}s)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ddsuite.scenarios import load_scenario

    loaded = load_scenario(args.scenario, args.set)
    name = getattr(loaded.config, "name", "scenario")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{stamp}"
    print(f"running scenario {name!r} ({loaded.kind.name}) -> {out}")
    summary = loaded.kind.run(loaded.config, out_dir=out, device=args.device,
                              resolved=loaded.resolved, overwrite=args.overwrite)
    print()
    print(summary)
    print(f"report folder: {out}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ddsuite.core.data import list_datasets
    from ddsuite.core.methods import describe_config, get_method, list_methods
    from ddsuite.core.models import list_models
    from ddsuite.scenarios import list_scenarios, load_scenario

    what = args.what
    if what in ("all", "datasets"):
        print("datasets:")
        for name in list_datasets():
            print(f"  {name}")
    if what in ("all", "models"):
        print("models:")
        print("  (options go in parentheses: convnet(depth=4,width=64,norm=batch,act=relu,"
              "pool=max))")
        for name in list_models():
            print(f"  {name}")
    if what in ("all", "methods"):
        print("methods:")
        names = list_methods()
        families = {name: get_method(name).family for name in names}
        width = max(map(len, names), default=0)
        family_width = max(map(len, families.values()), default=0)
        for name in names:
            cls = get_method(name)
            print(f"  {name:<{width}}  {families[name]:<{family_width}}  {cls.summary}")
            if args.details:
                rows = describe_config(cls.Config)
                widths = [max((len(str(r[i]) if i < 2 else repr(r[i])) for r in rows), default=0)
                          for i in range(3)]
                for field, kind, default, text in rows:
                    print(f"      {field:<{widths[0]}}  {kind:<{widths[1]}}  "
                          f"{default!r:<{widths[2]}}  {text}")
    if what in ("all", "scenarios"):
        print("scenarios:")
        names = list_scenarios()
        width = max(map(len, names), default=0)
        for name in names:
            loaded = load_scenario(name)
            description = " ".join(str(getattr(loaded.config, "description", "")).split())
            print(f"  {name:<{width}}  {loaded.kind.name:<16} {description}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler's stop, `kill`): unwound like Ctrl-C, so the run records
    itself as interrupted and keeps its last checkpoint."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except DDSuiteError as exc:
        print(f"ddsuite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be read or written
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"ddsuite {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"ddsuite {args.command}: {how}; the last checkpoint (if any) is kept",
              file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
