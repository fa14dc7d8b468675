"""Tests of the distillation engine and the evaluation protocol.

The engine: non-finite values stop a run without saving it, run-folder policies, resume that
reproduces an uninterrupted run, seeding and callbacks. The protocol: validation, stacked
training (loop and vmap agree), mean and std, and the input-space check.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddsuite.core.data import load_dataset
from ddsuite.core.engine import CHECKPOINT_FILE, Callback, distill, prepare_out_dir
from ddsuite.core.errors import (
    ConfigError,
    DDSuiteError,
    InputSpaceMismatchError,
    NonFiniteError,
)
from ddsuite.core.evaluation import (
    EvaluationProtocol,
    check_input_space,
    evaluate_images,
    train_networks,
)

from ddsuite.core.evaluation import networks_accuracy as accuracy_of
from ddsuite.core.methods import get_method, list_methods
from ddsuite.core.synthetic import META_FILE, TENSORS_FILE, load_artifact

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = EvaluationProtocol(num_eval=2, epochs=5)
DM = {"ipc": 1, "iterations": 5, "batch_real": 8, "model": "convnet(width=16)"}
CHEAP = {
    "dm": DM,
    "dsa": {**DM, "outer_loop": 1, "inner_loop": 1},
    "dc": {**DM, "iterations": 3, "outer_loop": 1, "inner_loop": 1},
    "random": {"ipc": 2},
    "herding": {"ipc": 2, "features": "pixels"},
    "k-center": {"ipc": 2, "features": "pixels"},
}


def cheap(method: str) -> dict:
    """A short config for `method` (methods registered later get the generic options)."""
    if method in CHEAP:
        return dict(CHEAP[method])
    fields = set(get_method(method).Config.__dataclass_fields__)
    if not get_method(method).iterative:
        fields.discard("iterations")  # one-shot selections refuse an iteration count
    options = {"ipc": 1, "iterations": 3, "batch_real": 8, "model": "convnet(width=16)",
               # trajectory matching: one short expert, trained in memory, never cached
               "num_experts": 1, "expert_epochs_train": 4, "syn_steps": 3, "max_start_epoch": 2,
               "experts_dir": "none"}
    return {k: v for k, v in options.items() if k in fields}


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple[str, int]] = []
        self.metrics: list[dict[str, float]] = []

    def on_start(self, ctx) -> None:
        self.events.append(("start", ctx.iteration))

    def on_step(self, ctx, metrics) -> None:
        self.events.append(("step", ctx.iteration))
        self.metrics.append(dict(metrics))

    def on_end(self, ctx) -> None:
        self.events.append(("end", ctx.iteration))


class InterruptAt(Callback):
    """Raises KeyboardInterrupt after iteration `at`, as Ctrl-C would."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, ctx, metrics) -> None:
        if ctx.iteration == self.at:
            raise KeyboardInterrupt


def _run_status(folder) -> str:
    return json.loads((folder / "run.json").read_text())["status"]


def _checkpoint(folder) -> dict:
    return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


# -- non-finite values -----------------------------------------------------------------------


def test_absurd_learning_rate_stops_with_non_finite_error(tmp_path, digits_splits):
    out = tmp_path / "run"
    config = {**DM, "lr_images": 1e30}
    with pytest.raises(NonFiniteError) as info:
        distill("dm", splits=digits_splits, config=config, seed=0, out_dir=out,
                checkpoint_every=1)
    error = info.value
    assert isinstance(error, DDSuiteError) and isinstance(error, FloatingPointError)
    assert f"iteration {error.iteration}" in str(error)
    assert "learning rate" in str(error)
    assert not (out / META_FILE).exists() and not (out / TENSORS_FILE).exists()
    assert _run_status(out) == "failed"
    if error.iteration > 0:  # the last good state is on disk
        state = _checkpoint(out)
        assert state["iteration"] == error.iteration
        assert torch.isfinite(state["syn"]["images_syn"]).all()


def test_first_non_finite_pixel_stops_the_run(tmp_path, digits_splits, monkeypatch):
    cls = get_method("dm")
    original = cls.step

    def poisoned(self, syn, *, iteration, generator):
        metrics = original(self, syn, iteration=iteration, generator=generator)
        if iteration == 2:
            with torch.no_grad():
                syn.images_syn[3, 0, 4, 4] = float("nan")
        return metrics

    monkeypatch.setattr(cls, "step", poisoned)
    recorder = Recorder()
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        distill("dm", splits=digits_splits, config=DM, seed=0, out_dir=out,
                checkpoint_every=1, callbacks=[recorder])
    assert info.value.iteration == 2
    assert "images_syn" in str(info.value)
    assert recorder.events == [("start", 0), ("step", 1), ("step", 2)]
    assert not (out / META_FILE).exists() and not (out / TENSORS_FILE).exists()
    state = _checkpoint(out)
    assert state["iteration"] == 2
    assert torch.isfinite(state["syn"]["images_syn"]).all()


# -- run-folder policies ---------------------------------------------------------------------


def test_existing_folder_is_refused_without_resume_or_overwrite(tmp_path, digits_splits):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        distill("random", splits=digits_splits, config=cheap("random"), out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_is_refused_for_a_folder_that_is_not_a_run(tmp_path, digits_splits):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match="not a ddsuite run folder"):
        distill("random", splits=digits_splits, config=cheap("random"), out_dir=out,
                overwrite=True)
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_replaces_a_finished_run(tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("random", splits=digits_splits, config=cheap("random"), seed=0, out_dir=out)
    (out / "grids").mkdir()
    (out / "grids" / "iteration_000002.png").write_bytes(b"from the old run")
    second = distill("random", splits=digits_splits, config=cheap("random"), seed=1,
                     out_dir=out, overwrite=True)
    assert not (out / "grids" / "iteration_000002.png").exists()
    artifact = load_artifact(out)
    assert artifact.meta["seed"] == 1
    assert torch.equal(artifact.images_syn, second.syn.images_syn.detach())


def test_overwrite_refuses_a_run_folder_holding_foreign_files(tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("random", splits=digits_splits, config=cheap("random"), seed=0, out_dir=out)
    (out / "thesis.tex").write_text("not ddsuite's")
    with pytest.raises(ConfigError, match="thesis.tex"):
        distill("random", splits=digits_splits, config=cheap("random"), seed=1,
                out_dir=out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "not ddsuite's"
    assert load_artifact(out).meta["seed"] == 0


def test_prepare_out_dir_rules(tmp_path):
    with pytest.raises(ConfigError, match="exclude each other"):
        prepare_out_dir(tmp_path / "a", resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        prepare_out_dir(tmp_path / "missing", resume=True, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_out_dir(tmp_path / "file", resume=False, overwrite=False)
    prepare_out_dir(tmp_path / "new" / "deep", resume=False, overwrite=False)
    assert (tmp_path / "new" / "deep").is_dir()


@pytest.fixture
def interrupted(tmp_path, digits_splits):
    """A dm run stopped by Ctrl-C after iteration 3, checkpointed at iteration 2."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill("dm", splits=digits_splits, config=DM, seed=5, out_dir=out,
                checkpoint_every=2, callbacks=[InterruptAt(3)])
    return out


def test_interrupted_run_keeps_its_checkpoint_and_no_artifact(interrupted):
    assert _checkpoint(interrupted)["iteration"] == 2
    assert not (interrupted / META_FILE).exists()
    assert _run_status(interrupted) == "interrupted"


@pytest.mark.parametrize("change, word", [({"lr_images": 0.5}, "config"),
                                          ({"batch_real": 4}, "config")])
def test_resume_with_another_config_is_refused(interrupted, digits_splits, change, word):
    with pytest.raises(ConfigError, match=word):
        distill("dm", splits=digits_splits, config={**DM, **change}, seed=5,
                out_dir=interrupted, resume=True)
    assert _checkpoint(interrupted)["iteration"] == 2


def test_resume_with_another_seed_is_refused(interrupted, digits_splits):
    with pytest.raises(ConfigError, match="seed"):
        distill("dm", splits=digits_splits, config=DM, seed=6, out_dir=interrupted,
                resume=True)


def test_resume_of_a_finished_run_with_another_config_is_refused(tmp_path, digits_splits):
    out = tmp_path / "run"
    distill("dm", splits=digits_splits, config={**DM, "iterations": 2}, seed=0, out_dir=out)
    with pytest.raises(ConfigError):
        distill("dm", splits=digits_splits, config={**DM, "iterations": 3}, seed=0,
                out_dir=out, resume=True)


def test_resume_of_a_finished_run_returns_the_saved_set(tmp_path, digits_splits):
    out = tmp_path / "run"
    first = distill("dm", splits=digits_splits, config={**DM, "iterations": 2}, seed=0,
                    out_dir=out)
    recorder = Recorder()
    again = distill("dm", splits=digits_splits, config={**DM, "iterations": 2}, seed=0,
                    out_dir=out, resume=True, callbacks=[recorder])
    assert torch.equal(again.syn.images_syn.detach(), first.syn.images_syn.detach())
    assert [e for e in recorder.events if e[0] == "step"] == []


@pytest.mark.parametrize("other", ["method", "input space"])
def test_resume_of_a_finished_run_made_differently_is_refused(tmp_path, digits_splits,
                                                              digits_zca, other):
    """The finished-run check must compare what the checkpoint key compares."""
    config = {"ipc": 1, "features": "pixels"}
    out = tmp_path / "run"
    distill("random", splits=digits_splits, config=config, seed=0, out_dir=out)
    if other == "method":
        kwargs = {"method": "herding", "splits": digits_splits}
    else:
        kwargs = {"method": "random", "splits": digits_zca}
    with pytest.raises(ConfigError):
        distill(config=config, seed=0, out_dir=out, resume=True, **kwargs)


# -- resume reproduces an uninterrupted run --------------------------------------------------


@pytest.mark.parametrize("method", [m for m in ("dm", "dsa") if m in list_methods()])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, digits_splits, method):
    config = cheap(method)
    whole = distill(method, splits=digits_splits, config=config, seed=11)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(method, splits=digits_splits, config=config, seed=11, out_dir=out,
                checkpoint_every=2, callbacks=[InterruptAt(3)])
    assert _checkpoint(out)["iteration"] == 2

    recorder = Recorder()
    resumed = distill(method, splits=digits_splits, config=config, seed=11, out_dir=out,
                      checkpoint_every=2, resume=True, callbacks=[recorder])
    steps = [i for kind, i in recorder.events if kind == "step"]
    assert recorder.events[0] == ("start", 2)
    assert steps == list(range(3, config["iterations"] + 1))
    torch.testing.assert_close(resumed.syn.images_syn.detach(), whole.syn.images_syn.detach(),
                               rtol=0, atol=1e-5)
    artifact = load_artifact(out)
    assert torch.equal(artifact.images_syn, resumed.syn.images_syn.detach())
    assert not (out / CHECKPOINT_FILE).exists()
    assert _run_status(out) == "finished"


# -- seeds and callbacks ---------------------------------------------------------------------


@pytest.mark.parametrize("method", list_methods())
def test_same_seed_gives_the_same_set(digits_splits, method):
    a = distill(method, splits=digits_splits, config=cheap(method), seed=4)
    b = distill(method, splits=digits_splits, config=cheap(method), seed=4)
    assert torch.equal(a.syn.images_syn.detach(), b.syn.images_syn.detach())


@pytest.mark.parametrize("method", [m for m in list_methods()
                                    if get_method(m).iterative or m == "random"])
def test_different_seed_gives_a_different_set(digits_splits, method):
    a = distill(method, splits=digits_splits, config=cheap(method), seed=4)
    b = distill(method, splits=digits_splits, config=cheap(method), seed=5)
    assert not torch.equal(a.syn.images_syn.detach(), b.syn.images_syn.detach())


def test_distill_leaves_the_global_rng_alone(digits_splits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill("dm", splits=digits_splits, config={**DM, "iterations": 2}, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_callbacks_see_iterations_in_order(digits_splits):
    first, second = Recorder(), Recorder()
    distill("dm", splits=digits_splits, config=DM, seed=0, callbacks=[first, second])
    n = DM["iterations"]
    expected = [("start", 0)] + [("step", i) for i in range(1, n + 1)] + [("end", n)]
    assert first.events == expected
    assert second.events == expected
    assert all(math.isfinite(m["loss"]) for m in first.metrics)


def test_one_shot_methods_call_start_and_end_only(digits_splits):
    recorder = Recorder()
    distill("random", splits=digits_splits, config=cheap("random"), callbacks=[recorder])
    assert recorder.events == [("start", 0), ("end", 0)]


# -- the evaluation protocol -----------------------------------------------------------------


def test_protocol_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        EvaluationProtocol(num_eval=0, models=(), epochs=0, optimizer="rmsprop", lr=0.0,
                           lr_decay_at=2.0, batch_size=0, label_loss="hinge")
    problems = info.value.problems
    assert len(problems) == 8
    text = str(info.value)
    for word in ("num_eval", "models", "epochs", "optimizer", "lr ", "lr_decay_at",
                 "batch_size", "label_loss"):
        assert word in text
    assert "sgd, adam" in text and "cross_entropy" in text


def test_protocol_refuses_an_unknown_augmentation_up_front():
    """A typo must not surface only when the first network trains, after a distillation."""
    with pytest.raises(ConfigError, match="no_such_op"):
        EvaluationProtocol(augmentation="no_such_op")


def test_protocol_round_trip_and_overrides():
    protocol = EvaluationProtocol(num_eval=3, epochs=7, models=("convnet", "mlp"))
    assert EvaluationProtocol.from_dict(json.loads(json.dumps(protocol.to_dict()))) == protocol
    changed = protocol.with_overrides(num_eval=2, epochs=None)
    assert (changed.num_eval, changed.epochs) == (2, 7)
    with pytest.raises(ConfigError, match="epoch.*allowed"):
        protocol.with_overrides(epoch=3)
    with pytest.raises(ConfigError, match="colour"):
        EvaluationProtocol.from_dict({**protocol.to_dict(), "colour": "red"})
    assert EvaluationProtocol().resolved_epochs == 300
    assert EvaluationProtocol(augmentation="color_crop").resolved_epochs == 1000


@pytest.fixture(scope="module")
def tiny_set(digits_splits):
    """Two real images per class, (20, 1, 8, 8), and their labels."""
    train = digits_splits.train
    index = train.sample_indices_per_class(2, generator=torch.Generator().manual_seed(0))
    index = index.reshape(-1)
    return train.images[index], train.labels[index]


@pytest.mark.parametrize("model", ["convnet(width=16)", "convnet(width=16,norm=batch)", "mlp"])
def test_loop_and_vmap_training_agree(digits_splits, tiny_set, model):
    images, labels = tiny_set
    protocol = EvaluationProtocol(num_eval=2, epochs=5, batch_size=8)
    test = digits_splits.test
    out = {}
    for mode in ("loop", "vmap"):
        networks = train_networks(images, labels, model=model, num_classes=10,
                                  protocol=protocol, device="cpu", seed=0, mode=mode)
        assert networks.num_networks == 2 and networks.mode == mode
        out[mode] = (accuracy_of(networks, test.images, test.labels), networks.final_loss)
    one_image = 1.0 / len(test)
    torch.testing.assert_close(out["loop"][0], out["vmap"][0], rtol=0, atol=1.5 * one_image)
    torch.testing.assert_close(out["loop"][1], out["vmap"][1], rtol=1e-3, atol=1e-4)


def test_training_is_seeded_and_networks_differ(tiny_set):
    images, labels = tiny_set
    kwargs = dict(model="convnet(width=16)", num_classes=10, protocol=SMALL, device="cpu")
    a = train_networks(images, labels, seed=3, **kwargs)
    b = train_networks(images, labels, seed=3, **kwargs)
    assert torch.equal(a.final_loss, b.final_loss)
    first = a.params["classifier.weight"]
    assert not torch.equal(first[0], first[1]), "the networks share an initialisation"
    assert a.mode == "loop"  # auto on the CPU


def test_evaluate_images_reports_mean_and_std_of_the_networks(digits_splits, tiny_set):
    images, labels = tiny_set
    protocol = EvaluationProtocol(num_eval=3, epochs=5, models=("convnet(width=16)", "mlp"))
    result = evaluate_images(images, labels, digits_splits, protocol=protocol, device="cpu")
    assert list(result.scores) == ["convnet(width=16)", "mlp"]
    for score in result.scores.values():
        accuracies = score.accuracies
        assert len(accuracies) == 3
        assert all(0.0 <= a <= 100.0 for a in accuracies)
        mean = sum(accuracies) / 3
        std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 3)
        assert score.mean == pytest.approx(mean)
        assert score.std == pytest.approx(std)
        assert score.diverged == 0
    record = result.to_dict()
    assert record["protocol"] == protocol.to_dict()
    assert record["num_images"] == 20 and record["labels"] == "hard"
    assert record["scores"]["mlp"]["mean"] == pytest.approx(result.scores["mlp"].mean)


def test_evaluate_images_refuses_images_of_another_shape(digits_splits):
    images = torch.zeros(10, 3, 8, 8)
    with pytest.raises(InputSpaceMismatchError, match=r"\(3, 8, 8\).*\(1, 8, 8\)"):
        evaluate_images(images, torch.arange(10), digits_splits, protocol=SMALL, device="cpu")


@pytest.fixture(scope="module")
def digits_zca():
    return load_dataset("digits", zca=True)


@pytest.fixture(scope="module")
def zca_artifact(tmp_path_factory, digits_zca):
    out = tmp_path_factory.mktemp("zca") / "run"
    distill("random", splits=digits_zca, config={"ipc": 1}, seed=0, out_dir=out)
    return load_artifact(out)


def test_set_made_with_zca_is_refused_without_zca(zca_artifact, digits_splits, digits_zca):
    check_input_space(zca_artifact.meta, digits_zca)  # the space it was made in: accepted
    with pytest.raises(InputSpaceMismatchError, match="ZCA") as info:
        check_input_space(zca_artifact.meta, digits_splits)
    assert "artifact.json" in str(info.value)


def test_set_made_without_zca_is_refused_with_zca(tmp_path, digits_splits, digits_zca):
    distill("random", splits=digits_splits, config={"ipc": 1}, out_dir=tmp_path / "run")
    meta = load_artifact(tmp_path / "run").meta
    check_input_space(meta, digits_splits)
    with pytest.raises(InputSpaceMismatchError, match="ZCA"):
        check_input_space(meta, digits_zca)


def test_input_space_check_names_class_and_normalisation_changes(zca_artifact, digits_zca):
    meta = json.loads(json.dumps(zca_artifact.meta))
    meta["dataset"]["num_classes"] = 7
    meta["input_space"]["mean"] = [0.9]
    with pytest.raises(InputSpaceMismatchError) as info:
        check_input_space(meta, digits_zca)
    assert "7 classes" in str(info.value) and "mean" in str(info.value)


class _InterruptAtEnd(Callback):
    def on_end(self, ctx) -> None:
        raise KeyboardInterrupt


class _CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_step(self, ctx, metrics) -> None:
        self.steps += 1


def test_an_interruption_in_the_final_callbacks_resumes_after_the_last_iteration(
        tmp_path, digits_splits):
    """A long final evaluation stopped by Ctrl-C or SIGTERM must not cost the iterations."""
    out = tmp_path / "run"
    config = {**DM, "iterations": 3}
    with pytest.raises(KeyboardInterrupt):
        distill("dm", splits=digits_splits, config=config, seed=5, out_dir=out,
                checkpoint_every=100, callbacks=[_InterruptAtEnd()])
    assert _checkpoint(out)["iteration"] == 3 and not (out / META_FILE).exists()
    counter = _CountSteps()
    resumed = distill("dm", splits=digits_splits, config=config, seed=5, out_dir=out,
                      checkpoint_every=100, resume=True, callbacks=[counter])
    whole = distill("dm", splits=digits_splits, config=config, seed=5)
    assert counter.steps == 0 and load_artifact(out).meta["iterations"] == 3
    torch.testing.assert_close(resumed.syn.images_syn, whole.syn.images_syn, rtol=0, atol=0)
