"""Tests of `dd` (unrolled meta-learning) and `sre2l` (squeeze, recover, relabel).

The generic checks (every method runs on digits, yields a finite class-major set) live in
test_methods.py; these check the maths and the named refusals of the two methods.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddsuite.core.engine import Callback, distill
from ddsuite.core.errors import NonFiniteError, UnsupportedFeatureError
from ddsuite.core.evaluation import evaluate_images
from ddsuite.core.methods.dd import DatasetDistillation, DDConfig, unrolled_real_loss
from ddsuite.core.methods.sre2l import (
    BatchNormStatistics,
    SRe2L,
    SRe2LConfig,
    bn_matching_loss,
)
from ddsuite.core.synthetic import is_artifact, load_artifact

pytestmark = pytest.mark.usefixtures("torch_single_thread")

DD_CHEAP = {"model": "convnet(width=8)", "batch_real": 8, "inner_steps": 2, "epochs": 2}
SRE2L_CHEAP = {"squeeze_model": "convnet(width=8,norm=batch)", "squeeze_steps": 10,
               "model": "convnet(width=8)"}


class Poison(Callback):
    """Writes a non-finite value into the set after the first iteration."""

    def __init__(self, where: str):
        self.where = where

    def on_step(self, ctx, metrics) -> None:
        with torch.no_grad():
            if self.where == "images":
                ctx.syn.images_syn[0, 0, 0, 0] = float("nan")
            else:
                ctx.syn.log_step_size.fill_(float("inf"))


# -- dd ----------------------------------------------------------------------------------


def _tiny_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    images = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    real = torch.randn(9, 1, 4, 4, dtype=torch.float64)
    labels_real = torch.tensor([0, 1, 2] * 3)
    step_sizes = torch.tensor([0.3, 0.2, 0.5], dtype=torch.float64)
    batches = [None, torch.tensor([0, 2, 4]), None]
    return net, images, labels, real, labels_real, step_sizes, batches


def test_dd_gradients_match_finite_differences():
    net, images, labels, real, labels_real, step_sizes, batches = _tiny_problem()

    def loss_of(x, eta):
        return unrolled_real_loss(net, x, labels, eta, real, labels_real, batches=batches)

    def numeric_loss(x, eta):
        return float(loss_of(x, eta).detach())

    x = images.clone().requires_grad_(True)
    eta = step_sizes.clone().requires_grad_(True)
    grad_x, grad_eta = torch.autograd.grad(loss_of(x, eta), [x, eta])
    eps = 1e-6
    g = torch.Generator().manual_seed(1)
    for flat in torch.randint(images.numel(), (6,), generator=g).tolist():
        plus, minus = images.clone(), images.clone()
        plus.view(-1)[flat] += eps
        minus.view(-1)[flat] -= eps
        numeric = (numeric_loss(plus, step_sizes) - numeric_loss(minus, step_sizes)) / (2 * eps)
        assert float(grad_x.view(-1)[flat]) == pytest.approx(numeric, rel=1e-5,
                                                             abs=1e-9)
    for j in range(len(step_sizes)):
        plus, minus = step_sizes.clone(), step_sizes.clone()
        plus[j] += eps
        minus[j] -= eps
        numeric = (numeric_loss(images, plus) - numeric_loss(images, minus)) / (2 * eps)
        assert float(grad_eta[j]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    assert grad_x.abs().sum() > 0


def test_dd_step_sizes_stay_positive_and_are_learned(digits_splits):
    config = DDConfig(ipc=1, iterations=4, **DD_CHEAP).resolve(dataset="digits")
    distiller = DatasetDistillation(config, splits=digits_splits, device="cpu")
    torch.manual_seed(0)
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    distiller.setup(syn)
    before = distiller.step_sizes(syn).detach().clone()
    assert torch.allclose(before, torch.full((4,), 0.02))
    for iteration in range(4):
        torch.manual_seed(iteration)
        distiller.step(syn, iteration=iteration,
                       generator=torch.Generator().manual_seed(iteration))
    after = distiller.step_sizes(syn).detach()
    assert after.shape == (config.inner_steps * config.epochs,)
    assert (after > 0).all()
    assert not torch.allclose(after, before), "the step sizes were not learned"
    assert len(set(after.tolist())) > 1, "the per-step step sizes moved together"
    # the artifact's step size is the geometric mean of the per-step ones
    geometric_mean = float(after.log().mean().exp())
    assert float(syn.step_size.detach()) == pytest.approx(geometric_mean, rel=1e-5)
    # positive by construction, however far the parameters go
    with torch.no_grad():
        syn.log_step_size.fill_(-80.0)
    assert (distiller.step_sizes(syn) > 0).all()


@pytest.mark.parametrize("where", ["images", "step size"])
def test_dd_non_finite_values_stop_the_run_and_save_nothing(digits_splits, tmp_path, where):
    with pytest.raises(NonFiniteError):
        distill("dd", splits=digits_splits, config={"ipc": 1, "iterations": 3, **DD_CHEAP},
                out_dir=tmp_path / "run", callbacks=[Poison(where)], checkpoint_every=0)
    assert not is_artifact(tmp_path / "run")


# -- sre2l -------------------------------------------------------------------------------


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2)).eval()


def test_bn_matching_loss_is_zero_at_the_running_statistics_and_positive_elsewhere():
    net = _bn_net()
    x = torch.randn(16, 1, 8, 8)
    # set every layer's running statistics to those of this batch (biased variance)
    with torch.no_grad():
        h = x
        for layer in net:
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.copy_(h.mean(dim=(0, 2, 3)))
                layer.running_var.copy_(h.var(dim=(0, 2, 3), unbiased=False))
            h = layer(h)
    with BatchNormStatistics(net) as stats:
        net(x)
    assert len(stats.pairs) == 2
    assert float(bn_matching_loss(stats.pairs).detach()) == pytest.approx(0.0, abs=1e-5)
    with BatchNormStatistics(net) as stats:
        net(2.0 * x + 1.0)
    assert float(bn_matching_loss(stats.pairs).detach()) > 0.1
    # hooks are removed on exit
    net(x)
    assert len(stats.pairs) == 2


def test_sre2l_refuses_a_model_without_batchnorm(digits_splits):
    config = SRe2LConfig(ipc=1, squeeze_model="convnet(width=8)").resolve(dataset="digits")
    with pytest.raises(UnsupportedFeatureError) as info:
        SRe2L(config, splits=digits_splits, device="cpu")
    message = str(info.value)
    assert "convnet(width=8)" in message and "convnet(norm=batch)" in message


def test_sre2l_artifact_carries_soft_labels_and_is_evaluated_on_them(digits_splits, tmp_path):
    config = {"ipc": 1, "iterations": 3, **SRE2L_CHEAP}
    result = distill("sre2l", splits=digits_splits, config=config, out_dir=tmp_path / "run")
    assert result.protocol.label_loss == "kl"
    artifact = load_artifact(tmp_path / "run")
    classes = digits_splits.train.num_classes
    assert artifact.labels_soft is not None
    assert tuple(artifact.labels_soft.shape) == (classes, classes)
    assert torch.isfinite(artifact.labels_soft).all()
    assert artifact.meta["protocol"]["label_loss"] == "kl"
    # the soft labels belong to the saved images
    distiller = result_distiller(config, digits_splits)
    torch.testing.assert_close(artifact.labels_soft, distiller.relabel(artifact.images_syn))
    protocol = result.protocol.with_overrides(num_eval=1, epochs=3)
    images, labels, labels_soft = artifact.decoded()
    evaluation = evaluate_images(images, labels, digits_splits, protocol=protocol,
                                 device="cpu", labels_soft=labels_soft)
    assert evaluation.labels == "soft"
    assert evaluation.to_dict()["protocol"]["label_loss"] == "kl"


def result_distiller(config: dict, splits) -> SRe2L:
    """The same squeezed network as the run's (the engine seeds initialize identically)."""
    resolved = SRe2LConfig(**config).resolve(dataset="digits")
    distiller = SRe2L(resolved, splits=splits, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        distiller.initialize(torch.Generator().manual_seed(0))
    return distiller


def test_sre2l_non_finite_images_stop_the_run_and_save_nothing(digits_splits, tmp_path):
    with pytest.raises(NonFiniteError):
        distill("sre2l", splits=digits_splits, config={"ipc": 1, "iterations": 3,
                                                        **SRE2L_CHEAP},
                out_dir=tmp_path / "run", callbacks=[Poison("images")], checkpoint_every=0)
    assert not is_artifact(tmp_path / "run")
