"""Run-folder safety: locks, status on interruption, readable files, verified checkpoints."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from ddsuite.cli.main import main
from ddsuite.core.data import from_tensors
from ddsuite.core.engine import CHECKPOINT_FILE, Callback, distill
from ddsuite.core.engine.loop import LOCK_FILE, RunLock
from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.core.synthetic import META_FILE, load_artifact

DM = {"ipc": 1, "iterations": 4, "batch_real": 8, "model": "convnet(width=16)"}


class StopAt(Callback):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_step(self, ctx, metrics) -> None:
        if ctx.iteration == self.iteration:
            raise KeyboardInterrupt


def interrupted_run(out, splits):
    """A DM run stopped after iteration 3, with its checkpoint from iteration 2."""
    with pytest.raises(KeyboardInterrupt):
        distill("dm", splits=splits, config=DM, out_dir=out, checkpoint_every=2,
                callbacks=[StopAt(3)])
    return out


def test_a_locked_run_folder_is_refused(tmp_path, digits_splits):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        (out / "run.json").write_text("{}")  # the folder now looks like a run in progress
        with pytest.raises(ConfigError, match="in use by another ddsuite process"):
            distill("dm", splits=digits_splits, config=DM, out_dir=out, resume=True)
    assert not (out / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over(tmp_path, digits_splits):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999999\n")  # no such process
    (out / "run.json").write_text(json.dumps({"key": {}}))
    (out / CHECKPOINT_FILE).write_bytes(b"")  # not a checkpoint: resume must say so
    with pytest.raises(DDSuiteError, match="unreadable or was not written by ddsuite"):
        distill("dm", splits=digits_splits, config=DM, out_dir=out, resume=True)
    assert not (out / LOCK_FILE).exists()


def test_interrupted_run_is_marked_and_resumes(tmp_path, digits_splits):
    out = interrupted_run(tmp_path / "run", digits_splits)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "interrupted" and status["at_iteration"] == 3
    resumed = distill("dm", splits=digits_splits, config=DM, out_dir=out, resume=True)
    straight = distill("dm", splits=digits_splits, config=DM)
    assert torch.equal(resumed.syn.images_syn, straight.syn.images_syn)


def test_tampered_checkpoint_iteration_is_refused(tmp_path, digits_splits):
    out = interrupted_run(tmp_path / "run", digits_splits)
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    state["iteration"] = 999
    torch.save(state, out / CHECKPOINT_FILE)
    with pytest.raises(DDSuiteError, match="iteration 999 is outside 0..4"):
        distill("dm", splits=digits_splits, config=DM, out_dir=out, resume=True)
    assert not (out / META_FILE).exists()


def test_resume_with_other_settings_names_the_difference(tmp_path, digits_splits):
    out = interrupted_run(tmp_path / "run", digits_splits)
    with pytest.raises(ConfigError, match=r"config\.iterations: checkpoint 4, now 6"):
        distill("dm", splits=digits_splits, config={**DM, "iterations": 6}, out_dir=out,
                resume=True)


def test_written_files_follow_the_umask(tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("dm", splits=digits_splits, config=DM, out_dir=out)
    mask = os.umask(0)
    os.umask(mask)
    for name in (META_FILE, "run.json"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o666 & ~mask, f"{name} has mode {oct(mode)}"
    assert load_artifact(out).ipc == 1


def test_a_single_class_dataset_is_refused():
    images = torch.rand(6, 1, 4, 4)
    with pytest.raises(ConfigError, match="at least 2"):
        from_tensors(images, torch.zeros(6, dtype=torch.long), images,
                     torch.zeros(6, dtype=torch.long))


def test_ipc_given_twice_is_refused(capsys, tmp_path):
    code = main(["distill", "--method", "dm", "--ipc", "1", "--set", "ipc=5",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "ipc given twice" in err
    assert not (tmp_path / "run").exists()


def test_scenario_reports_item_problems_together_and_writes_nothing(capsys, tmp_path):
    scenario = tmp_path / "bad.yaml"
    scenario.write_text(
        "name: bad\nkind: distill-compare\ndataset: {name: nosuch}\n"
        "methods: [foo, {name: dmm}, {name: dm, iterations: -4}]\n"
        "ipc: [0, x, 1]\nseeds: []\nevaluation: {num_eval: 0}\ndevice: tpu\n"
    )
    out = tmp_path / "report"
    code = main(["run", str(scenario), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    for text in ("nosuch", "methods[0]", "'dmm'", "iterations must be >= 0", "ipc:",
                 "seeds:", "num_eval", "'tpu'"):
        assert text in err, f"{text!r} not in {err!r}"
    assert not out.exists()


def test_tensorboard_periodic_evaluation_and_grids(capsys, tmp_path):
    out = tmp_path / "run"
    code = main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "4",
                 "--set", "model=convnet(width=16)", "--eval-every", "2", "--grid-every", "2",
                 "--tensorboard", "--num-eval", "1", "--eval-epochs", "2",
                 "--models", "convnet(width=16)", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    grids = sorted(p.name for p in (out / "grids").glob("*.png"))
    assert grids == ["iteration_000000.png", "iteration_000002.png", "iteration_000004.png"]
    history = json.loads((out / META_FILE).read_text())["history"]
    assert [h["iteration"] for h in history] == [2, 4]


def test_overwrite_checks_inside_ddsuite_named_folders(tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("dm", splits=digits_splits, config=DM, out_dir=out)
    (out / "grids").mkdir()
    (out / "grids" / "mydata.csv").write_text("the user's")
    with pytest.raises(ConfigError, match="grids/mydata.csv"):
        distill("dm", splits=digits_splits, config=DM, out_dir=out, overwrite=True)
    assert (out / "grids" / "mydata.csv").read_text() == "the user's"


def test_resume_refuses_a_folder_ddsuite_did_not_write(tmp_path, digits_splits):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    with pytest.raises(ConfigError, match="not a ddsuite run folder"):
        distill("dm", splits=digits_splits, config=DM, out_dir=out, resume=True)
    assert (out / "summary.md").read_text() == "my notes"


def test_edited_dataset_name_is_an_artifact_error(capsys, tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("dm", splits=digits_splits, config=DM, out_dir=out)
    meta = json.loads((out / META_FILE).read_text())
    meta["dataset"]["name"] = 5
    (out / META_FILE).write_text(json.dumps(meta))
    code = main(["evaluate", str(out), "--num-eval", "1", "--eval-epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "dataset.name must be a string" in err and "Traceback" not in err
