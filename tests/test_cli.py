"""End-to-end tests of the `ddsuite` command, in process and as a real console script."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from ddsuite.cli import main as cli_main
from ddsuite.cli.main import main
from ddsuite.core.data import list_datasets
from ddsuite.core.methods import list_methods
from ddsuite.core.models import list_models
from ddsuite.core.synthetic import META_FILE, TENSORS_FILE, load_artifact
from ddsuite.scenarios import list_scenarios, load_scenario

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL_EVAL = ["--num-eval", "2", "--eval-epochs", "5"]
DISTILL_DM = ["distill", "--dataset", "digits", "--method", "dm", "--ipc", "1",
              "--iterations", "3", *SMALL_EVAL]
TINY_RUN = ["--set", "ipc=[1]", "--set", "evaluation.num_eval=2",
            "--set", "evaluation.epochs=5"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory) -> Path:
    """One `ddsuite distill` run folder, shared read-only by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "dm-run"
    assert main([*DISTILL_DM, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(distilled_run, tmp_path) -> Path:
    """A private copy of the shared run, for tests that change or damage it."""
    return Path(shutil.copytree(distilled_run, tmp_path / "run"))


# -- list ------------------------------------------------------------------------------------


def test_list_shows_every_registered_name(capsys):
    code, out, _ = run_main(capsys, ["list"])
    assert code == 0
    for heading in ("datasets:", "models:", "methods:", "scenarios:"):
        assert heading in out
    rows = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    listed = set(rows) | {row.split()[0] for row in rows}
    for name in [*list_datasets(), *list_models(), *list_methods(), *list_scenarios()]:
        assert name in listed, f"{name} missing from `ddsuite list`"


def test_list_methods_verbose_shows_options(capsys):
    code, out, _ = run_main(capsys, ["list", "methods", "-v"])
    assert code == 0
    assert "datasets:" not in out
    for option in ("ipc", "lr_images", "outer_loop", "features"):
        assert option in out


# -- distill and evaluate --------------------------------------------------------------------


def test_distill_writes_the_run_folder(distilled_run):
    names = {p.name for p in distilled_run.iterdir()}
    assert {TENSORS_FILE, META_FILE, "run.json", "metrics.json", "summary.md",
            "grid.png"} <= names
    assert "checkpoint.pt" not in names
    assert not [n for n in names if n.endswith(".tmp")]

    artifact = load_artifact(distilled_run)
    assert artifact.method == "dm" and artifact.ipc == 1 and artifact.num_classes == 10
    assert artifact.meta["config"]["iterations"] == 3
    assert artifact.meta["protocol"]["num_eval"] == 2
    assert artifact.meta["protocol"]["epochs"] == 5
    scores = artifact.meta["metrics"]["evaluation"]["scores"]
    assert list(scores) == ["convnet"] and len(scores["convnet"]["accuracies"]) == 2

    run = json.loads((distilled_run / "run.json").read_text())
    assert run["status"] == "finished" and run["iterations"] == 3
    metrics = json.loads((distilled_run / "metrics.json").read_text())
    assert metrics["evaluation"]["scores"]["convnet"]["accuracies"] == \
        scores["convnet"]["accuracies"]
    assert metrics["method"] == "dm" and metrics["config"]["ipc"] == 1
    assert metrics["dataset"]["name"] == "digits" and metrics["seed"] == 0
    summary = (distilled_run / "summary.md").read_text()
    assert "| model" in summary and "| convnet" in summary and "±" in summary
    assert "dm on digits, ipc 1" in summary and "fingerprint" in summary


def test_distill_grid_is_a_valid_png(distilled_run):
    data = (distilled_run / "grid.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 8 and height >= 10 * 8  # one row per class, ipc 1 column
    from PIL import Image

    with Image.open(distilled_run / "grid.png") as image:
        image.verify()


def test_distill_prints_where_and_how_well(capsys, tmp_path):
    code, out, err = run_main(capsys, [*DISTILL_DM, "--out", tmp_path / "run"])
    assert code == 0, err
    assert "dm" in out and str(tmp_path / "run") in out
    assert "convnet:" in out and "2 networks" in out


def test_evaluate_prints_every_model_and_records_it(capsys, run_copy):
    before = load_artifact(run_copy)
    code, out, err = run_main(capsys, ["evaluate", run_copy, *SMALL_EVAL,
                                       "--models", "convnet,mlp"])
    assert code == 0, err
    assert "convnet:" in out and "mlp:" in out
    artifact = load_artifact(run_copy)  # still valid: the tensors were not touched
    assert artifact.meta["tensors_sha256"] == before.meta["tensors_sha256"]
    records = artifact.meta["metrics"]["evaluations"]
    assert len(records) == 1
    assert set(records[0]["scores"]) == {"convnet", "mlp"}
    assert records[0]["protocol"]["num_eval"] == 2
    assert records[0]["protocol"]["models"] == ["convnet", "mlp"]
    assert "evaluation" in artifact.meta["metrics"]  # the distill-time result is kept
    saved = list((run_copy / "evaluations").glob("*.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["scores"].keys() == {"convnet", "mlp"}


def test_two_evaluations_in_the_same_second_are_both_kept(capsys, run_copy, monkeypatch):
    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(cli_main, "_dt", types.SimpleNamespace(datetime=FrozenClock))
    for _ in range(2):
        code, _, err = run_main(capsys, ["evaluate", run_copy, "--num-eval", "1",
                                         "--eval-epochs", "2"])
        assert code == 0, err
    assert len(load_artifact(run_copy).meta["metrics"]["evaluations"]) == 2
    assert len(list((run_copy / "evaluations").glob("*.json"))) == 2


# -- bad inputs: exit code 2 and a message that names the problem ----------------------------


def _smallest_class(digits_splits) -> tuple[int, int]:
    counts = digits_splits.train.class_counts
    c = min(range(len(counts)), key=counts.__getitem__)
    return c, counts[c]


BAD_DISTILL = {
    "unknown dataset": (["--dataset", "nodata", "--method", "dm", "--ipc", "1"],
                        ["unknown dataset 'nodata'", "digits", "mnist"]),
    "unknown method": (["--method", "dmx", "--ipc", "1"],
                       ["unknown method 'dmx'", *list_methods()]),
    "unknown model": (["--method", "dm", "--ipc", "1", "--models", "convnet,nosuchnet"],
                      ["unknown model 'nosuchnet'", "convnet", "mlp"]),
    "ipc 0": (["--method", "dm", "--ipc", "0"], ["ipc", ">= 1", "got 0"]),
    "negative ipc": (["--method", "random", "--ipc", "-3"], ["ipc", ">= 1"]),
    "unknown option": (["--method", "dm", "--ipc", "1", "--set", "lr_imgs=0.1"],
                       ["lr_imgs", "unknown option", "lr_images"]),
    "bad option value": (["--method", "dm", "--ipc", "1", "--set", "momentum=2"],
                         ["momentum", "[0, 1)"]),
    "dotted option": (["--method", "dm", "--ipc", "1", "--set", "evaluation.num_eval=2"],
                      ["evaluation.num_eval", "no dots"]),
}


@pytest.mark.parametrize("case", list(BAD_DISTILL))
def test_distill_bad_input_exits_2_naming_the_problem(capsys, tmp_path, case):
    argv, expected = BAD_DISTILL[case]
    code, out, err = run_main(capsys, ["distill", *argv, "--iterations", "2", *SMALL_EVAL,
                                       "--out", tmp_path / "run"])
    assert code == 2
    assert "ddsuite distill: error:" in err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    assert "Traceback" not in err


def test_ipc_above_the_smallest_class_names_it(capsys, tmp_path, digits_splits):
    c, size = _smallest_class(digits_splits)
    code, _, err = run_main(capsys, ["distill", "--method", "random", "--ipc", size + 1,
                                     "--out", tmp_path / "run"])
    assert code == 2
    assert f"ipc {size + 1}" in err and f"class {c}" in err and f"{size} training" in err
    assert not (tmp_path / "run").exists()
    code, _, err = run_main(capsys, ["distill", "--method", "random", "--ipc", size,
                                     "--no-eval", "--out", tmp_path / "run"])
    assert code == 0, err


def test_no_eval_still_writes_provenance_and_storage_and_says_how_to_evaluate(capsys,
                                                                              tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, ["distill", "--method", "idc", "--ipc", "1",
                                          "--iterations", "1", "--set", "inner_loop=1",
                                          "--no-eval", "--out", out])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluation"] is None and metrics["seed"] == 0
    assert metrics["storage"]["decode"] == {"kind": "partition-expand", "factor": 2}
    assert metrics["storage"]["decoded_ipc"] == 4
    assert metrics["storage"]["size_bytes"] == load_artifact(out).size_bytes()
    assert "decode to 4 images per class" in stdout
    assert f"ddsuite evaluate {out}" in (out / "summary.md").read_text()


def test_unknown_model_is_reported_before_distilling(capsys, tmp_path):
    """A typo in --models must not cost the whole distillation (nor leave a broken run)."""
    out = tmp_path / "run"
    code, _, err = run_main(capsys, [*DISTILL_DM, "--models", "convnet,nosuchnet",
                                     "--out", out])
    assert code == 2 and "nosuchnet" in err
    assert not out.exists() or list(out.iterdir()) == []


def test_existing_out_is_refused(capsys, run_copy):
    before = sorted(p.name for p in run_copy.iterdir())
    code, _, err = run_main(capsys, [*DISTILL_DM, "--out", run_copy])
    assert code == 2
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in run_copy.iterdir()) == before
    load_artifact(run_copy)


def test_resume_of_a_finished_run_is_a_no_op(capsys, run_copy):
    images = load_artifact(run_copy).images_syn
    code, _, err = run_main(capsys, [*DISTILL_DM, "--no-eval", "--resume", "--out", run_copy])
    assert code == 0, err
    assert load_artifact(run_copy).images_syn.equal(images)


def test_overwrite_replaces_a_run(capsys, run_copy):
    code, _, err = run_main(capsys, [*DISTILL_DM, "--seed", "1", "--no-eval", "--overwrite",
                                     "--out", run_copy])
    assert code == 0, err
    assert load_artifact(run_copy).meta["seed"] == 1


@pytest.mark.parametrize("damage", ["truncate", "delete meta"])
def test_evaluate_on_a_damaged_artifact(capsys, run_copy, damage):
    if damage == "truncate":
        data = (run_copy / TENSORS_FILE).read_bytes()
        (run_copy / TENSORS_FILE).write_bytes(data[: len(data) // 3])
        expected = ["checksum", TENSORS_FILE]
    else:
        (run_copy / META_FILE).unlink()
        expected = [META_FILE, "missing"]
    code, _, err = run_main(capsys, ["evaluate", run_copy, *SMALL_EVAL])
    assert code == 2
    assert "ddsuite evaluate: error:" in err
    for text in expected:
        assert text in err
    assert "Traceback" not in err


def test_evaluate_with_an_unknown_model(capsys, run_copy):
    code, _, err = run_main(capsys, ["evaluate", run_copy, *SMALL_EVAL, "--models", "mlpp"])
    assert code == 2 and "unknown model 'mlpp'" in err and "mlp" in err


# -- scenarios -------------------------------------------------------------------------------


def test_unknown_scenario_lists_the_shipped_ones(capsys, tmp_path):
    code, _, err = run_main(capsys, ["run", "no-such-scenario", "--out", tmp_path / "r"])
    assert code == 2
    assert "unknown scenario 'no-such-scenario'" in err
    for name in list_scenarios():
        assert name in err


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_scenario_problems_are_reported_together(capsys, tmp_path):
    path = _write_yaml(tmp_path / "bad.yaml", {
        "name": "bad", "kind": "distill-compare",
        "methods": [{"name": "nosuchmethod"}, {"name": "dm", "bogus": 1}],
        "ipc": [0], "seeds": [],
    })
    code, _, err = run_main(capsys, ["run", path, "--out", tmp_path / "r"])
    assert code == 2
    assert "4 problem(s)" in err
    for text in ("methods[0].name", "nosuchmethod", "methods[1].bogus", "ipc", "seeds",
                 "herding"):
        assert text in err
    assert not (tmp_path / "r").exists()


def test_scenario_problems_in_every_section_are_reported_together(capsys, tmp_path):
    """Dataset and evaluation problems must not hide the methods/ipc/seeds ones."""
    path = _write_yaml(tmp_path / "bad.yaml", {
        "name": "bad", "kind": "distill-compare",
        "dataset": {"name": "nosuchset"},
        "methods": [{"name": "nosuchmethod"}],
        "ipc": [0], "seeds": [],
        "evaluation": {"num_eval": 0},
    })
    code, _, err = run_main(capsys, ["run", path, "--out", tmp_path / "r"])
    assert code == 2
    for text in ("dataset.name", "nosuchset", "evaluation", "num_eval", "methods[0].name",
                 "ipc", "seeds"):
        assert text in err, f"{text!r} not reported in {err!r}"


@pytest.mark.parametrize("override, expected", [
    ("bogus=1", ["bogus", "unknown option", "methods"]),
    ("evaluation.num_evals=2", ["num_evals", "num_eval"]),
    ("noequals", ["key=value"]),
    ("kind=other", ["kind", "distill-compare"]),
])
def test_run_with_a_bad_override(capsys, tmp_path, override, expected):
    code, _, err = run_main(capsys, ["run", "quickstart", "--set", override,
                                     "--out", tmp_path / "r"])
    assert code == 2
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("scenario") / "report"
    methods = "methods=[{name: random}, {name: dm, iterations: 2}]"
    code = main(["run", "quickstart", *TINY_RUN, "--set", methods, "--out", str(out)])
    return out, code


def test_run_quickstart_tiny_writes_the_report(tiny_report):
    out, code = tiny_report
    assert code == 0
    summary = (out / "summary.md").read_text()
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "method" and "IPC 1" in table[0]
    assert set(table[1]) <= set("|- ")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["random", "dm"]
    assert all("±" in row for row in table[2:])
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scenario"] == "quickstart"
    assert metrics["protocol"]["num_eval"] == 2 and metrics["protocol"]["epochs"] == 5
    assert set(metrics["results"]) == {"random", "dm"}
    for result in metrics["results"].values():
        assert list(result) == ["1"]
        assert len(result["1"]["accuracies"]) == 2

    resolved = yaml.safe_load((out / "scenario.yaml").read_text())
    assert resolved["ipc"] == [1]
    assert resolved["methods"] == [{"name": "random"}, {"name": "dm", "iterations": 2}]
    for label in ("random-ipc1-seed0", "dm-ipc1-seed0"):
        artifact = load_artifact(out / "sets" / label)
        assert artifact.meta["protocol"]["num_eval"] == 2


def test_run_overwrite_replaces_its_own_report(capsys, tmp_path):
    out = tmp_path / "report"
    argv = ["run", "quickstart", *TINY_RUN, "--set", "methods=[{name: random}]",
            "--out", out]
    assert run_main(capsys, argv)[0] == 0
    code, _, err = run_main(capsys, argv)
    assert code == 2 and "--overwrite" in err
    assert "--resume" not in err  # `ddsuite run` has no --resume to suggest
    code, _, err = run_main(capsys, [*argv, "--overwrite"])
    assert code == 0, err
    assert (out / "summary.md").is_file()


# -- the real console script -----------------------------------------------------------------


def _console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("ddsuite")
    assert script.is_file(), f"console script not installed at {script}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_console_script_list(tmp_path):
    proc = _console("list", "methods", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in list_methods():
        assert name in proc.stdout


def test_console_script_bad_input_exits_2(tmp_path):
    proc = _console("distill", "--method", "nosuch", "--ipc", "1", "--out", "run",
                    cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown method 'nosuch'" in proc.stderr and "dm" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_console_script_distills_and_evaluates(tmp_path):
    proc = _console("distill", "--method", "random", "--ipc", "1", *SMALL_EVAL,
                    "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_artifact(tmp_path / "run").method == "random"
    proc = _console("evaluate", "run", *SMALL_EVAL, "--models", "mlp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mlp:" in proc.stdout


def test_every_shipped_scenario_validates():
    for name in list_scenarios():
        loaded = load_scenario(name)
        assert loaded.config.name == name


def test_exponent_numbers_without_a_dot_are_numbers_in_overrides_and_scenario_files(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; a learning rate typed that way must be a float."""
    from ddsuite.scenarios import apply_overrides

    assert apply_overrides({}, ["lr_images=1e-3", "x.y=-2E+4", "name=1e"]) == {
        "lr_images": 0.001, "x": {"y": -20000.0}, "name": "1e"}
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nkind: distill-compare\ndataset: {name: digits}\n"
                    "methods:\n  - name: dm\n    lr_images: 5e-1\nipc: [1]\n")
    loaded = load_scenario(str(path), ["evaluation.lr=1e-2"])
    assert loaded.resolved["methods"][0]["lr_images"] == 0.5
    assert loaded.config.evaluation.lr == 0.01


def test_sigterm_marks_the_run_interrupted_and_keeps_its_checkpoint(tmp_path):
    """A scheduler's SIGTERM unwinds like Ctrl-C: run.json says interrupted, not running."""
    import signal
    import time

    script = Path(sys.executable).parent / "ddsuite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(script), "distill", "--method", "dm", "--ipc", "1",
                             "--iterations", "100000", "--checkpoint-every", "5", "--no-eval",
                             "--out", "run"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated; the last checkpoint" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "interrupted"
    assert checkpoint.exists()


def test_one_seed_shows_no_invented_spread():
    from ddsuite.core.report import format_mean_std

    assert format_mean_std(96.634, 0.0, 2, n=1) == "96.63 (n=1)"
    assert format_mean_std(96.634, 0.5, 2, n=3) == "96.63 ± 0.50"


def test_a_comparison_says_when_a_set_is_bigger_than_its_ipc(capsys, tmp_path):
    methods = "methods=[{name: random}, {name: idc, iterations: 1, inner_loop: 1}]"
    code = main(["run", "quickstart", *TINY_RUN, "--set", methods, "--out", str(tmp_path / "r")])
    assert code == 0
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "idc at IPC 1 stores 1.03" in summary and "trains networks on 4 per class" in summary
    assert "random at IPC" not in summary
    results = json.loads((tmp_path / "r" / "metrics.json").read_text())["results"]
    assert results["idc"]["1"]["decoded_ipc"] == 4 and results["random"]["1"]["decoded_ipc"] == 1
