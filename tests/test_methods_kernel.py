"""Tests of the kernel family (KIP, RFAD, FRePo) and their shared kernel ridge solver."""

from __future__ import annotations

import math

import pytest
import torch

from ddsuite.core.engine import Callback, distill
from ddsuite.core.errors import ConfigError, NonFiniteError
from ddsuite.core.evaluation.evaluate import evaluate_images
from ddsuite.core.methods import config_from_dict, get_method
from ddsuite.core.methods.frepo import FRePoConfig
from ddsuite.core.methods.kip import KIP, KIPConfig
from ddsuite.core.methods.kernel_ridge import (
    centred_one_hot,
    fc_relu_kernel,
    initial_label_logits,
    krr_predict,
    krr_solve,
)
from ddsuite.core.methods.rfad import RFADConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KERNEL_METHODS = ("kip", "rfad", "frepo")
# Small, fast versions of each method for a CPU test.
CHEAP = {
    "kip": {},
    "rfad": {"num_models": 2, "feature_model": "convnet(width=32,norm=none)"},
    "frepo": {"model": "convnet(width=16)", "num_models": 2},
}


def _psd(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return phi @ phi.T


# -- the solver ------------------------------------------------------------------------------


def test_krr_solve_matches_a_direct_solve():
    k_ss = _psd(12, 20)
    y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ridge = 0.1
    direct = torch.linalg.solve(k_ss + ridge * k_ss.trace() / 12 * torch.eye(12), y)
    torch.testing.assert_close(krr_solve(k_ss, y, ridge=ridge), direct)

    k_ts = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(krr_predict(k_ts, k_ss, y, ridge=ridge), k_ts @ direct)


def test_krr_ridge_scales_with_the_kernel_trace():
    """The same ridge gives the same prediction for a kernel multiplied by any constant."""
    k_ss, y = _psd(8, 10), torch.randn(8, 2, dtype=torch.float64)
    k_ts = torch.randn(3, 8, dtype=torch.float64)
    small = krr_predict(k_ts, k_ss, y, ridge=1e-2)
    large = krr_predict(1e4 * k_ts, 1e4 * k_ss, y, ridge=1e-2)
    torch.testing.assert_close(small, large)


@pytest.mark.parametrize("ridge", [0.0, 1e-6])
def test_singular_kernel_is_regularised_and_stays_finite(ridge):
    k_ss = _psd(10, 2).float()  # rank 2 of 10: singular
    y = centred_one_hot(torch.arange(10) % 5, 5)
    k_ts = torch.randn(4, 10)
    k_ss.requires_grad_(True)
    prediction = krr_predict(k_ts, k_ss, y, ridge=ridge)
    assert torch.isfinite(prediction).all()
    prediction.square().sum().backward()
    assert torch.isfinite(k_ss.grad).all()


def test_kip_with_duplicate_synthetic_images_stays_finite(digits_splits):
    config = KIPConfig(ipc=2, batch_real=8).resolve(dataset="digits")
    kip = KIP(config, splits=digits_splits, device="cpu")
    syn = kip.initialize(torch.Generator().manual_seed(0))
    with torch.no_grad():
        syn.images_syn[1::2] = syn.images_syn[0::2]  # every image twice: K_ss is singular
    kip.setup(syn)
    metrics = kip.step(syn, iteration=0, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(metrics["loss"])
    assert torch.isfinite(syn.images_syn).all()


def test_nan_kernel_raises_before_the_solve():
    k_ss = _psd(4, 4).float()
    k_ss[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="support kernel"):
        krr_solve(k_ss, torch.zeros(4, 2), ridge=1e-6, iteration=7)


def test_nan_kernel_stops_the_run_and_saves_nothing(digits_splits, tmp_path, monkeypatch):
    def nan_kernel(self, x1, x2):
        return torch.full((x1.shape[0], x2.shape[0]), float("nan")) + 0 * x2.sum()

    monkeypatch.setattr(KIP, "kernel", nan_kernel)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="kernel"):
        distill("kip", splits=digits_splits, config={"ipc": 1, "iterations": 3}, seed=0,
                out_dir=out, checkpoint_every=1)
    saved = [p.name for p in out.rglob("*")] if out.exists() else []
    assert not any(name.endswith((".safetensors", ".pt")) for name in saved), saved


# -- the analytic kernel ---------------------------------------------------------------------


def test_fc_relu_nngp_matches_wide_random_networks():
    """The arc-cosine NNGP against the readout covariance of many random ReLU networks."""
    depth, width, nets, weight_var, bias_var = 2, 1024, 40, 2.0, 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    analytic = fc_relu_kernel(x, x, depth=depth, kind="nngp", weight_var=weight_var,
                              bias_var=bias_var)
    estimate = torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(nets):
        h, fan_in = x, x.shape[1]
        for _ in range(depth):
            w = torch.randn(fan_in, width, generator=g, dtype=torch.float64)
            b = torch.randn(width, generator=g, dtype=torch.float64)
            h = torch.relu(h @ w * math.sqrt(weight_var / fan_in) + b * math.sqrt(bias_var))
            fan_in = width
        estimate += weight_var * (h @ h.T) / width + bias_var  # covariance of the readout
    estimate /= nets
    torch.testing.assert_close(estimate, analytic, rtol=0.05, atol=0.02)


def test_fc_relu_ntk_is_symmetric_and_dominates_the_nngp():
    x = torch.randn(6, 9, generator=torch.Generator().manual_seed(0))
    nngp = fc_relu_kernel(x, x, depth=3, kind="nngp")
    ntk = fc_relu_kernel(x, x, depth=3, kind="ntk")
    torch.testing.assert_close(ntk, ntk.T)
    assert (ntk >= nngp - 1e-5).all()
    assert torch.linalg.eigvalsh(ntk.double()).min() > -1e-6


# -- the distillers --------------------------------------------------------------------------


def _losses_on_fixed_draws(method: str, splits, iterations: int = 20, **options) -> list[float]:
    """The objective at successive iterates, every iteration with the same draws (real batch,
    random networks), so it changes only through the optimiser."""
    cls = get_method(method)
    values = {"ipc": 2, "batch_real": 16, "lr_images": 0.01, **CHEAP[method], **options}
    config = config_from_dict(cls.Config, values).resolve(dataset="digits")
    distiller = cls(config, splits=splits, device="cpu")
    torch.manual_seed(0)
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    distiller.setup(syn)
    losses = []
    for i in range(iterations):
        torch.manual_seed(1)
        metrics = distiller.step(syn, iteration=i, generator=torch.Generator().manual_seed(1))
        losses.append(metrics["loss"])
    return losses


@pytest.mark.parametrize("method", KERNEL_METHODS)
def test_loss_decreases_on_digits(digits_splits, method):
    # FRePo's pool network is held (nearly) still, so only the images and labels move.
    extra = {"lr_model": 1e-12, "num_models": 1} if method == "frepo" else {}
    losses = _losses_on_fixed_draws(method, digits_splits, **extra)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("method", ["frepo", "kip"])
def test_learned_labels_change_and_are_evaluated_with_a_soft_loss(digits_splits, method):
    config = {"ipc": 1, "iterations": 10, "batch_real": 16, "learn_labels": True,
              "lr_labels": 0.05, **CHEAP[method]}
    result = distill(method, splits=digits_splits, config=config, seed=0)
    syn = result.syn
    assert isinstance(syn.labels_soft, torch.nn.Parameter)
    initial = initial_label_logits(syn.labels_syn, syn.num_classes,
                                   confidence=result.config.label_confidence)
    assert (syn.labels_soft.detach() - initial).abs().max() > 1e-3
    assert result.protocol.label_loss == "soft_cross_entropy"

    protocol = result.protocol.with_overrides(num_eval=1, epochs=2,
                                              models=("convnet(width=8)",))
    evaluation = evaluate_images(syn.images_syn.detach(), syn.labels_syn, digits_splits,
                                 protocol=protocol, device="cpu",
                                 labels_soft=syn.labels_soft.detach())
    assert evaluation is not None


def test_fixed_labels_keep_the_hard_label_protocol():
    protocol = get_method("kip").eval_protocol(KIPConfig(ipc=1).resolve(dataset="digits"))
    assert protocol.label_loss == "cross_entropy"


class _InterruptAt(Callback):
    def __init__(self, iteration: int):
        self.iteration = iteration

    def on_step(self, ctx, metrics) -> None:
        if ctx.iteration == self.iteration:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["frepo", "rfad"])
def test_resumed_run_equals_an_uninterrupted_one(digits_splits, tmp_path, method):
    """FRePo's pool (networks, optimisers, ages) and RFAD's Platt scale are checkpointed.

    One pool network, so the network trained before the checkpoint is used after it."""
    config = {"ipc": 1, "iterations": 5, "batch_real": 8, "lr_images": 0.01,
              **CHEAP[method], "num_models": 1, "max_online_updates": 50}
    config = {k: v for k, v in config.items()
              if k in get_method(method).Config.__dataclass_fields__}
    whole = distill(method, splits=digits_splits, config=config, seed=3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(method, splits=digits_splits, config=config, seed=3, out_dir=out,
                checkpoint_every=2, callbacks=[_InterruptAt(3)])
    resumed = distill(method, splits=digits_splits, config=config, seed=3, out_dir=out,
                      resume=True)
    for name, tensor in whole.syn.tensors().items():  # bit for bit
        assert torch.equal(resumed.syn.tensors()[name], tensor), name


# -- configs ---------------------------------------------------------------------------------


def test_published_defaults_are_resolved():
    kip = KIPConfig(ipc=10).resolve(dataset="digits")
    assert (kip.lr_images, kip.ridge, kip.learn_labels) == (0.01, 1e-6, False)
    rfad = RFADConfig(ipc=10).resolve(dataset="cifar10")
    assert (rfad.lr_images, rfad.num_models, rfad.loss) == (1e-3, 8, "platt")
    frepo = FRePoConfig(ipc=3).resolve(dataset="digits")
    assert frepo.learn_labels is True and frepo.iterations > 0


def test_kernel_configs_report_every_problem():
    with pytest.raises(ConfigError) as info:
        KIPConfig(ipc=1, ridge=-1.0, depth=0, kernel="rbf",
                  label_confidence=1.5).resolve(dataset="digits")
    text = "\n".join(info.value.problems)
    for word in ("ridge", "depth", "kernel", "label_confidence"):
        assert word in text
