"""Tests of trajectory matching: expert storage, mtt/tesla gradients, step size, memory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace

import pytest
import torch

from ddsuite.core.augment import DiffAugment
from ddsuite.core.data import InputSpace
import ddsuite.core.engine.callbacks as callbacks
from ddsuite.core.engine import Callback, FinalEvaluation, distill
from ddsuite.core.engine.loop import resolve_config
from ddsuite.core.errors import ExpertTrajectoryError, MemoryEstimateError, NonFiniteError
from ddsuite.core.experts import (
    META_FILE,
    ExpertSpec,
    get_experts,
    load_experts,
    train_experts,
)
from ddsuite.core.experts import train as experts_train
from ddsuite.core.methods.trajectory import (
    PUBLISHED_SETTINGS,
    MTTConfig,
    StudentModel,
    TESLAConfig,
    draw_unroll,
    estimate_step_memory,
    recomputed_matching_gradients,
    student_loss,
    unrolled_matching_loss,
)
from ddsuite.core.methods import get_method
from ddsuite.core.models import build_model
from ddsuite.core.synthetic import load_artifact

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SPEC = ExpertSpec(model="convnet(width=8)", epochs=3, num_experts=2, augmentation="crop_scale")
# A short run on digits: experts of 4 epochs, 3 student steps, 2 iterations.
TINY = {"ipc": 1, "iterations": 2, "model": "convnet(width=8)", "num_experts": 1,
        "expert_epochs_train": 4, "syn_steps": 3, "max_start_epoch": 2, "expert_epochs": 2}


@pytest.fixture(scope="module")
def stored_experts(digits_splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return root, get_experts(digits_splits, SPEC, device="cpu", experts_dir=root)


# -- expert trajectories ---------------------------------------------------------------------


def test_experts_round_trip_through_safetensors_and_json(digits_splits, stored_experts):
    root, experts = stored_experts
    assert experts.folder is not None and experts.folder.parent == root
    names = sorted(p.name for p in experts.folder.iterdir())
    assert names == sorted([META_FILE, "expert_000.safetensors", "expert_001.safetensors"])
    meta = json.loads((experts.folder / META_FILE).read_text())
    assert meta["dataset"]["fingerprint"] == digits_splits.identity.fingerprint
    assert meta["input_space"] == digits_splits.input_space.to_dict()
    assert meta["model"] == "convnet(width=8)" and meta["augmentation"] == "crop_scale"
    assert meta["optimizer"]["lr"] == 0.01 and meta["optimizer"]["batch_size"] == 256
    assert meta["epochs"] == 3 and meta["seed"] == 0 and "torch" in meta["versions"]

    in_memory, _ = train_experts(digits_splits, SPEC, device="cpu")  # same seeds, same result
    for expert in range(2):
        assert in_memory[expert].shape == (4, experts.num_params)
        for epoch in (0, 3):
            torch.testing.assert_close(experts.snapshot(expert=expert, epoch=epoch, device="cpu"),
                                       in_memory[expert][epoch], rtol=0, atol=0)
    assert not torch.equal(in_memory[0][0], in_memory[0][3]), "the expert did not train"
    assert not torch.equal(in_memory[0][0], in_memory[1][0]), "experts share a seed"


def test_second_request_reuses_the_cache(digits_splits, stored_experts, monkeypatch):
    root, experts = stored_experts

    def refuse(*args, **kwargs):
        raise AssertionError("experts were trained again")

    monkeypatch.setattr(experts_train, "train_experts", refuse)
    again = get_experts(digits_splits, SPEC, device="cpu", experts_dir=root)
    assert again.folder == experts.folder
    with pytest.raises(AssertionError, match="trained again"):  # another setting: new key
        get_experts(digits_splits, dataclasses.replace(SPEC, epochs=4), device="cpu",
                    experts_dir=root)


def test_experts_made_for_another_run_are_refused(digits_splits, stored_experts):
    _, experts = stored_experts
    identity = digits_splits.identity
    with pytest.raises(ExpertTrajectoryError, match="dataset: made on 'digits'.*'mnist'"):
        load_experts(experts.folder, dataset=dataclasses.replace(identity, name="mnist"))
    with pytest.raises(ExpertTrajectoryError, match="fingerprint"):
        load_experts(experts.folder, dataset=dataclasses.replace(identity, fingerprint="0" * 64))
    with pytest.raises(ExpertTrajectoryError, match="model: made with 'convnet.width=8.'"):
        load_experts(experts.folder, model="convnet(width=16)")
    with pytest.raises(ExpertTrajectoryError, match="input space"):
        load_experts(experts.folder, input_space=InputSpace(mean=[0.5], std=[0.5]))
    loaded = load_experts(experts.folder, dataset=identity, model="convnet(width=8)",
                          input_space=digits_splits.input_space)
    assert loaded.num_experts == 2


def test_damaged_expert_file_is_refused(digits_splits, tmp_path):
    spec = dataclasses.replace(SPEC, num_experts=1, epochs=1)
    experts = get_experts(digits_splits, spec, device="cpu", experts_dir=tmp_path)
    path = experts.folder / "expert_000.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertTrajectoryError, match="checksum"):
        load_experts(experts.folder)


# -- the gradient: tesla's recomputation equals mtt's unrolled graph -------------------------


@pytest.mark.parametrize("soft", [False, True])
def test_tesla_gradient_equals_mtt_gradient(soft):
    torch.manual_seed(0)
    net = build_model("convnet(width=4,depth=2)", in_channels=1, num_classes=3,
                      image_size=(8, 8), device="cpu").double()
    student = StudentModel(net)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    targets = (torch.randn(6, 3, generator=g, dtype=torch.float64) if soft
               else torch.arange(3).repeat_interleave(2))
    theta_start = torch.cat([p.detach().flatten() for p in net.parameters()])
    theta_target = theta_start + 0.05 * torch.randn(theta_start.shape, generator=g,
                                                    dtype=torch.float64)
    log_step = torch.tensor(-2.0, dtype=torch.float64)
    augment = DiffAugment("crop_scale_rotate")
    draws = draw_unroll(6, syn_steps=4, batch_syn=4, augment=augment, generator=g, device="cpu")

    leaves = [images.clone().requires_grad_(), log_step.clone().requires_grad_()]
    if soft:
        leaves.append(targets.clone().requires_grad_())
    loss = unrolled_matching_loss(student, leaves[0], leaves[2] if soft else targets,
                                  leaves[1].exp(), theta_start, theta_target, draws=draws,
                                  augment=augment)
    expected = torch.autograd.grad(loss, leaves)

    result = recomputed_matching_gradients(student, images, targets, log_step.exp(),
                                           theta_start, theta_target, draws=draws,
                                           augment=augment, learn_targets=soft)
    torch.testing.assert_close(result.loss, loss.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(result.images, expected[0], rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(result.step_size * log_step.exp(), expected[1], rtol=1e-7,
                               atol=1e-12)
    if soft:
        torch.testing.assert_close(result.targets, expected[2], rtol=1e-7, atol=1e-12)
    assert expected[0].abs().sum() > 0 and expected[1].abs() > 0
    # Dropping the terms that reach an image through later student parameters (TESLA's
    # published shortcut) gives another gradient here: the equality above is not trivial.
    first_order = _first_order_image_gradient(student, images, targets, log_step.exp(),
                                              theta_start, theta_target, draws, augment)
    assert not torch.allclose(first_order, expected[0], rtol=1e-3, atol=1e-9)


def _first_order_image_gradient(student, images, targets, step_size, theta_start,
                                theta_target, draws, augment):
    """Image gradient with every step's adjoint replaced by the final one."""
    thetas, theta = [], theta_start
    for j in range(len(draws)):
        thetas.append(theta)
        current = theta.clone().requires_grad_()
        x = augment.apply(images[draws.indices[j]], draws.augment[j])
        loss = student_loss(student(current, x), targets[draws.indices[j]])
        theta = theta - step_size * torch.autograd.grad(loss, current)[0]
    adjoint = 2 * (theta - theta_target) / ((theta_start - theta_target) ** 2).sum()
    leaf = images.clone().requires_grad_()
    total = torch.zeros_like(images)
    for j in range(len(draws)):
        current = thetas[j].clone().requires_grad_()
        x = augment.apply(leaf[draws.indices[j]], draws.augment[j])
        loss = student_loss(student(current, x), targets[draws.indices[j]])
        grad = torch.autograd.grad(loss, current, create_graph=True)[0]
        total -= step_size * torch.autograd.grad((grad * adjoint).sum(), leaf)[0]
    return total


# -- runs on digits --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mtt", "tesla"])
def test_step_size_is_learned_positive_and_saved(digits_splits, tmp_path, method):
    config = {**TINY, "experts_dir": str(tmp_path / "experts"), "lr_step_size": 1e-3}
    result = distill(method, splits=digits_splits, config=config, seed=0,
                     out_dir=tmp_path / "run")
    step_size = float(result.syn.step_size.detach())
    assert step_size > 0 and step_size != pytest.approx(0.01, rel=1e-6)
    artifact = load_artifact(tmp_path / "run")
    saved = float(artifact.tensors["log_step_size"].exp())
    assert saved == pytest.approx(step_size, rel=1e-6)
    # MTT's protocol trains evaluation networks with the learned step size, not the initial
    assert result.protocol.lr == pytest.approx(step_size, rel=1e-6)
    assert artifact.meta["protocol"]["lr"] == pytest.approx(step_size, rel=1e-6)


def test_final_evaluation_trains_with_the_learned_step_size(digits_splits, tmp_path,
                                                            monkeypatch):
    seen = []
    monkeypatch.setattr(callbacks, "evaluate_images",
                        lambda *a, protocol, **k: seen.append(protocol) or _FakeResult())
    config = {**TINY, "experts_dir": str(tmp_path / "experts"), "lr_step_size": 1e-3}
    config_obj = resolve_config("mtt", config, dataset="digits")
    protocol = get_method("mtt").eval_protocol(config_obj)
    other = replace(protocol, name="dc", lr=0.05)
    result = distill("mtt", splits=digits_splits, config=config, seed=0,
                     callbacks=[FinalEvaluation(protocol), FinalEvaluation(other)])
    learned = float(result.syn.step_size.detach())
    assert seen[0].lr == pytest.approx(learned, rel=1e-6) and learned != 0.01
    assert seen[1].lr == 0.05  # a protocol that is not MTT's keeps its learning rate


class _FakeResult:
    def to_dict(self):
        return {}


def test_tesla_soft_labels_are_expert_logits_and_evaluated_soft(digits_splits, tmp_path):
    config = {**TINY, "experts_dir": str(tmp_path / "experts"), "soft_labels": True,
              "learn_labels": True}
    result = distill("tesla", splits=digits_splits, config=config, seed=0,
                     out_dir=tmp_path / "run")
    assert result.protocol.label_loss == "soft_cross_entropy"
    artifact = load_artifact(tmp_path / "run")
    assert artifact.meta["labels"] == "soft"
    assert artifact.labels_soft.shape == (10, 10) and torch.isfinite(artifact.labels_soft).all()
    assert artifact.meta["protocol"]["label_loss"] == "soft_cross_entropy"


@pytest.mark.parametrize("method", ["mtt", "tesla"])
def test_non_finite_step_size_or_loss_stops_without_saving(digits_splits, tmp_path, method):
    config = {**TINY, "experts_dir": str(tmp_path / "experts"), "step_size_init": 1e38}
    with pytest.raises(NonFiniteError):
        distill(method, splits=digits_splits, config=config, seed=0, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "artifact.json").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_non_finite_step_size_is_refused_before_the_unroll(digits_splits):
    from ddsuite.core.methods import get_method

    cls = get_method("tesla")
    config = cls.Config(**{**TINY, "experts_dir": "none"}).resolve(dataset="digits")
    distiller = cls(config, splits=digits_splits, device="cpu")
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    distiller.setup(syn)
    before = syn.images_syn.detach().clone()
    with torch.no_grad():
        syn.log_step_size.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="step size"):
        distiller.step(syn, iteration=0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(syn.images_syn.detach(), before)


class _InterruptAt(Callback):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_step(self, ctx, metrics) -> None:
        if ctx.iteration == self.iteration:
            raise KeyboardInterrupt


def test_resumed_tesla_run_equals_uninterrupted(digits_splits, tmp_path):
    config = {**TINY, "iterations": 3, "experts_dir": str(tmp_path / "experts"),
              "soft_labels": True, "learn_labels": True, "lr_step_size": 1e-3}
    whole = distill("tesla", splits=digits_splits, config=config, seed=3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill("tesla", splits=digits_splits, config=config, seed=3, out_dir=out,
                checkpoint_every=1, callbacks=[_InterruptAt(2)])
    resumed = distill("tesla", splits=digits_splits, config=config, seed=3, out_dir=out,
                      checkpoint_every=1, resume=True)
    for name, tensor in whole.syn.tensors().items():
        torch.testing.assert_close(resumed.syn.tensors()[name], tensor, rtol=0, atol=1e-6)


# -- memory estimate -------------------------------------------------------------------------


def _estimate(method: str, syn_steps: int, **kwargs) -> int:
    return estimate_step_memory(method=method, num_params=320_000, activation_bytes=500_000,
                                batch_syn=100, syn_steps=syn_steps, num_images=100,
                                image_numel=3 * 32 * 32, **kwargs).total


def test_memory_estimate_grows_with_syn_steps_for_mtt_not_tesla():
    assert _estimate("mtt", 80) > 4 * _estimate("mtt", 10)
    assert _estimate("tesla", 80, snapshots_on_device=False) == _estimate(
        "tesla", 10, snapshots_on_device=False)
    grown_tesla = _estimate("tesla", 80) - _estimate("tesla", 10)
    grown_mtt = _estimate("mtt", 80) - _estimate("mtt", 10)
    assert 0 < grown_tesla < 0.02 * grown_mtt  # only the parameter vectors, on the CPU
    assert _estimate("tesla", 80) < _estimate("mtt", 80) / 10


def test_configuration_that_does_not_fit_stops_at_once(digits_splits, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("experts were trained before the memory check")

    monkeypatch.setattr(experts_train, "train_experts", refuse)
    config = {**TINY, "experts_dir": "none", "memory_limit_gb": 1e-4, "syn_steps": 40}
    with pytest.raises(MemoryEstimateError) as info:
        distill("mtt", splits=digits_splits, config=config, seed=0)
    message = str(info.value)
    for knob in ("syn_steps (now 40)", "batch_syn", "width", "tesla", "memory_limit_gb"):
        assert knob in message
    with pytest.raises(MemoryEstimateError) as info:
        distill("tesla", splits=digits_splits, config={**config, "memory_limit_gb": 1e-6},
                seed=0)
    assert "method tesla" not in str(info.value)


# -- published defaults ----------------------------------------------------------------------


@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_published_settings_at_listed_ipcs(ipc):
    config = MTTConfig(ipc=ipc, expert_epochs_train=50).resolve(dataset="cifar10")
    published = PUBLISHED_SETTINGS["cifar10"][ipc]
    for name, value in published.items():
        assert getattr(config, name) == pytest.approx(value), name
    assert config.iterations == 5000 and config.step_size_init == 0.01
    assert config.batch_syn is None


def test_unlisted_ipcs_interpolate_and_other_datasets_fall_back():
    mid = MTTConfig(ipc=5).resolve(dataset="cifar10")
    assert 20 < mid.syn_steps < 50 and 2 < mid.max_start_epoch < 20
    assert 1e-7 < mid.lr_step_size < 1e-5
    assert MTTConfig(ipc=50).resolve(dataset="cifar100").batch_syn == 125
    assert TESLAConfig(ipc=1).resolve(dataset="svhn").syn_steps == 50  # CIFAR-10's
    # a start epoch whose target lies beyond the experts' last snapshot
    assert MTTConfig(ipc=1, max_start_epoch=50, expert_epochs=2).problems()
    assert TESLAConfig(learn_labels=True).problems()


def test_digit_datasets_take_ddsuite_settings_not_cifar_image_rate():
    """CIFAR-10's lr_images of 1000 blows digit pixels up; the MNIST family and digits use 10,
    and digits (6 expert steps per epoch) a short student unroll."""
    digits = MTTConfig(ipc=1).resolve(dataset="digits")
    assert (digits.lr_images, digits.syn_steps, digits.max_start_epoch) == (10, 10, 4)
    assert MTTConfig(ipc=10).resolve(dataset="digits").max_start_epoch == 10
    for name in ("mnist", "Fashion-MNIST"):
        config = MTTConfig(ipc=10).resolve(dataset=name)
        assert config.lr_images == 10
        assert config.syn_steps == PUBLISHED_SETTINGS["cifar10"][10]["syn_steps"]
    assert MTTConfig(ipc=1).resolve(dataset="cifar10").lr_images == 1000
