"""Tests of the distillers: every registered method on digits, gradient matching, selectors.

Each method runs a few cheap iterations through `ddsuite.core.engine.distill`; the options
below are applied to whichever config fields a method has, so a newly registered method is
covered without editing this file.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddsuite.core.engine import Callback, distill
from ddsuite.core.evaluation import evaluate_images
from ddsuite.core.methods import get_method, list_methods
from ddsuite.core.methods.gradient_matching import (
    INNER_LOOP_ANCHORS,
    MATCH_DISTANCES,
    OUTER_LOOP_ANCHORS,
    DCConfig,
    DSAConfig,
    gradient_distance,
)
from ddsuite.core.selection import herding, k_center, select

pytestmark = pytest.mark.usefixtures("torch_single_thread")

METHODS = list_methods()
ITERATIVE = [m for m in METHODS if get_method(m).iterative]
ONE_SHOT = [m for m in METHODS if not get_method(m).iterative]
IPCS = (1, 2)

# Applied to every config field of the same name: a short, cheap run of any method.
CHEAP_OPTIONS = {
    "iterations": 3,
    "model": "convnet(width=16)",
    "batch_real": 16,
    "inner_loop": 1,
    "outer_loop": 2,
    "features": "pixels",
    "feature_steps": 5,
    "num_experts": 1,
    "expert_epochs_train": 6,
    "syn_steps": 4,
    "experts_dir": "none",
    "squeeze_steps": 5,
}


def cheap_config(method: str, ipc: int, **overrides) -> dict:
    names = {f.name for f in dataclasses.fields(get_method(method).Config)}
    if not get_method(method).iterative:
        names.discard("iterations")  # one-shot selections refuse an iteration count
    options = {k: v for k, v in CHEAP_OPTIONS.items() if k in names}
    return {**options, **overrides, "ipc": ipc}


class Recorder(Callback):
    """Keeps the starting images and every step's metrics."""

    def __init__(self):
        self.initial: torch.Tensor | None = None
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_start(self, ctx) -> None:
        self.initial = ctx.syn.images_syn.detach().clone()

    def on_step(self, ctx, metrics) -> None:
        self.steps.append((ctx.iteration, dict(metrics)))


@pytest.fixture(scope="module")
def runs(digits_splits):
    """Short runs of (method, ipc), each done once per module and shared by the tests."""
    cache: dict[tuple[str, int], tuple] = {}

    def get(method: str, ipc: int):
        if (method, ipc) not in cache:
            recorder = Recorder()
            result = distill(method, splits=digits_splits, config=cheap_config(method, ipc),
                             seed=0, callbacks=[recorder])
            cache[method, ipc] = (result, recorder)
        return cache[method, ipc]

    return get


# -- every registered method -----------------------------------------------------------------


def test_every_method_is_registered_with_a_documented_config():
    assert {"dc", "dsa", "dm", "random", "herding", "k-center"} <= set(METHODS)
    for name in METHODS:
        cls = get_method(name)
        assert cls.name == name
        assert cls.summary and cls.family
        for f in dataclasses.fields(cls.Config):
            assert f.metadata.get("help"), f"{name}: option {f.name} has no description"


@pytest.mark.parametrize("ipc", IPCS)
@pytest.mark.parametrize("method", METHODS)
def test_distilled_set_shape_finite_and_class_major(runs, digits_splits, method, ipc):
    result, _ = runs(method, ipc)
    syn = result.syn
    classes = digits_splits.train.num_classes
    assert syn.num_classes == classes and syn.ipc == ipc
    assert tuple(syn.images_syn.shape) == (classes * ipc, 1, 8, 8)
    assert torch.isfinite(syn.images_syn).all()
    assert syn.labels_syn.dtype == torch.int64
    assert torch.equal(syn.labels_syn.cpu(), torch.arange(classes).repeat_interleave(ipc))
    assert result.config.ipc == ipc


@pytest.mark.parametrize("ipc", IPCS)
@pytest.mark.parametrize("method", ITERATIVE)
def test_iterative_method_moves_images_with_finite_loss(runs, method, ipc):
    result, recorder = runs(method, ipc)
    assert recorder.initial is not None
    assert [i for i, _ in recorder.steps] == list(range(1, result.config.iterations + 1))
    assert not torch.allclose(result.syn.images_syn.detach(), recorder.initial), (
        f"{method} left the synthetic images at their initialisation")
    for iteration, metrics in recorder.steps:
        assert "loss" in metrics
        assert torch.isfinite(torch.tensor(metrics["loss"])), (iteration, metrics)


@pytest.mark.parametrize("ipc", IPCS)
@pytest.mark.parametrize("method", ONE_SHOT)
def test_coreset_images_are_training_images_of_their_class(runs, digits_splits, method, ipc):
    result, _ = runs(method, ipc)
    train = digits_splits.train
    images = result.syn.images_syn.detach().flatten(1)  # (classes * ipc, 64)
    real = train.images.flatten(1)  # (N, 64)
    for row, label in zip(images, result.syn.labels_syn.tolist()):
        matches = (real == row).all(dim=1).nonzero().flatten()
        assert matches.numel() >= 1, f"{method}: image of class {label} is not a training image"
        assert label in train.labels[matches].tolist()
    per_class = images.view(train.num_classes, ipc, -1)
    for c in range(train.num_classes):
        assert torch.unique(per_class[c], dim=0).shape[0] == ipc, "a real image chosen twice"


def test_coreset_with_trained_net_features(digits_splits):
    config = cheap_config("herding", 2, features="trained-net", feature_steps=5)
    result = distill("herding", splits=digits_splits, config=config, seed=0)
    real = digits_splits.train.images.flatten(1)
    for row in result.syn.images_syn.detach().flatten(1):
        assert (real == row).all(dim=1).any()


@pytest.mark.parametrize("method", [m for m in ("dc", "dm") if m in METHODS])
def test_ipc_one_with_batchnorm_model_runs(digits_splits, method):
    config = cheap_config(method, 1, model="convnet-bn", iterations=2)
    result = distill(method, splits=digits_splits, config=config, seed=0)
    assert torch.isfinite(result.syn.images_syn).all()
    assert tuple(result.syn.images_syn.shape) == (10, 1, 8, 8)


# -- gradient matching -----------------------------------------------------------------------


def _gradients(seed: int, classes: int = 3) -> dict[str, torch.Tensor]:
    """Per-class gradients shaped like a small conv net's: (classes, *param_shape)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(classes, 4, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(classes, 4, generator=g),
        "fc.weight": torch.randn(classes, 5, 4, generator=g),
        "fc.bias": torch.randn(classes, 5, generator=g),
    }


@pytest.mark.parametrize("distance", MATCH_DISTANCES)
def test_gradient_distance_zero_for_identical_gradients(distance):
    g = _gradients(0)
    value = gradient_distance(g, {k: v.clone() for k, v in g.items()}, distance=distance)
    assert float(value) == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("distance", MATCH_DISTANCES)
def test_gradient_distance_positive_for_different_gradients(distance):
    value = gradient_distance(_gradients(0), _gradients(1), distance=distance)
    assert float(value) > 0.1


@pytest.mark.parametrize("distance", MATCH_DISTANCES)
def test_gradient_distance_is_differentiable_in_the_synthetic_gradients(distance):
    g_real = _gradients(0)
    g_syn = {k: v.clone().requires_grad_() for k, v in _gradients(1).items()}
    gradient_distance(g_real, g_syn, distance=distance).backward()
    assert torch.isfinite(g_syn["conv.weight"].grad).all()
    assert g_syn["conv.weight"].grad.abs().sum() > 0


def test_layerwise_cosine_skips_one_dimensional_parameters():
    """DC matches weight rows only; biases (per class, 1-D) do not count."""
    g = _gradients(0)
    other = {k: (v + 5.0 if k.endswith("bias") else v.clone()) for k, v in g.items()}
    assert float(gradient_distance(g, other, distance="layerwise-cosine")) == pytest.approx(
        0.0, abs=1e-4)
    assert float(gradient_distance(g, other, distance="mse")) > 0


def _loops(config_cls, ipc: int) -> tuple[int, int]:
    config = config_cls(ipc=ipc).resolve(dataset="digits")
    return config.outer_loop, config.inner_loop


@pytest.mark.parametrize("config_cls", [DCConfig, DSAConfig])
@pytest.mark.parametrize("ipc, outer, inner", [(1, 1, 1), (10, 10, 50), (50, 50, 10)])
def test_dc_loops_follow_published_anchors(config_cls, ipc, outer, inner):
    assert _loops(config_cls, ipc) == (outer, inner)


@pytest.mark.parametrize("ipc", [2, 5, 9, 17, 33, 49, 51, 120])
def test_dc_loops_interpolate_between_anchors(ipc):
    outer, inner = _loops(DCConfig, ipc)
    assert isinstance(outer, int) and isinstance(inner, int)
    keys = sorted(OUTER_LOOP_ANCHORS)
    lo = max((k for k in keys if k <= ipc), default=keys[0])
    hi = min((k for k in keys if k >= ipc), default=keys[-1])
    for value, anchors in ((outer, OUTER_LOOP_ANCHORS), (inner, INNER_LOOP_ANCHORS)):
        low, high = sorted((anchors[lo], anchors[hi]))
        assert low <= value <= high, (ipc, value, low, high)
    assert outer >= 1 and inner >= 0


def test_dc_explicit_loops_are_kept():
    config = DCConfig(ipc=10, outer_loop=3, inner_loop=0).resolve(dataset="digits")
    assert (config.outer_loop, config.inner_loop) == (3, 0)


def test_dc_config_reports_every_problem():
    problems = DCConfig(ipc=0, distance="l7", outer_loop=0, lr_net=0.0).problems()
    text = "\n".join(problems)
    for word in ("ipc", "distance", "outer_loop", "lr_net"):
        assert word in text
    assert "layerwise-cosine" in text


# -- coreset selectors -----------------------------------------------------------------------


def _features(n: int = 40, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_herding_first_pick_is_nearest_the_mean():
    features = _features()
    nearest = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    chosen = herding(features, 5, torch.Generator().manual_seed(0))
    assert int(chosen[0]) == nearest
    assert len(set(chosen.tolist())) == 5


def test_herding_keeps_the_running_mean_near_the_class_mean():
    features = _features(n=60)
    mean = features.mean(dim=0)
    chosen = herding(features, 10, torch.Generator())
    herded = (features[chosen].mean(dim=0) - mean).norm()
    g = torch.Generator().manual_seed(1)
    random_gaps = [(features[torch.randperm(60, generator=g)[:10]].mean(dim=0) - mean).norm()
                   for _ in range(20)]
    assert herded < min(random_gaps)


@pytest.mark.parametrize("selector", [herding, k_center])
def test_selectors_are_deterministic_and_distinct(selector):
    features = _features()
    a = selector(features, 8, torch.Generator().manual_seed(0))
    b = selector(features, 8, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 8
    assert all(0 <= i < 40 for i in a.tolist())


def test_k_center_picks_farthest_points():
    features = _features()
    chosen = k_center(features, 4, torch.Generator()).tolist()
    nearest = int((features - features.mean(dim=0)).norm(dim=1).argmin())
    assert chosen[0] == nearest
    second = int((features - features[nearest]).norm(dim=1).argmax())
    assert chosen[1] == second


@pytest.mark.parametrize("selector", [herding, k_center])
def test_selectors_pick_distinct_rows_when_features_repeat(selector):
    """Duplicate feature rows (identical images, dead features) are still distinct rows."""
    features = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    chosen = selector(features, 4, torch.Generator()).tolist()
    assert sorted(chosen) == [0, 1, 2, 3]


@pytest.mark.parametrize("rule", ["random", "herding", "k-center"])
def test_select_returns_class_major_indices_of_each_class(digits_splits, rule):
    train = digits_splits.train
    index = select(rule, train.images.flatten(1), train.class_index, 3,
                   generator=torch.Generator().manual_seed(0))
    assert index.shape == (train.num_classes * 3,)
    labels = train.labels[index]
    assert torch.equal(labels.cpu(), torch.arange(train.num_classes).repeat_interleave(3))


def test_per_class_gradients_loop_and_vmap_agree():
    from ddsuite.core.methods.gradient_matching import per_class_gradients
    from ddsuite.core.models import build_model

    torch.manual_seed(0)
    net = build_model("convnet(width=8)", in_channels=1, num_classes=3, image_size=(8, 8),
                      device="cpu")
    images = torch.randn(3, 4, 1, 8, 8, requires_grad=True)
    looped = per_class_gradients(net, images, create_graph=True, mode="loop")
    vmapped = per_class_gradients(net, images, create_graph=True, mode="vmap")
    assert set(looped) == {name for name, _ in net.named_parameters()}
    for name in looped:
        assert looped[name].shape[0] == 3
        torch.testing.assert_close(looped[name], vmapped[name], rtol=1e-4, atol=1e-6)
    # Both keep the graph to the images, and give the same image gradient.
    g_loop = torch.autograd.grad(sum(v.square().sum() for v in looped.values()), images)[0]
    g_vmap = torch.autograd.grad(sum(v.square().sum() for v in vmapped.values()), images)[0]
    torch.testing.assert_close(g_loop, g_vmap, rtol=1e-3, atol=1e-6)
    assert g_loop.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_yields_a_set_that_trains_a_network_above_chance(runs, digits_splits,
                                                                     method):
    """The set as networks see it (decoded, with soft labels where the method's protocol
    uses them) trains a small ConvNet to beat the 10 % of guessing on digits. Methods that
    start from noise (dd, sre2l, the private ones) cannot after 3 cheap iterations; their
    own files test what they learn."""
    result, _ = runs(method, 1)
    if get_method(method).iterative and result.config.init != "real":
        pytest.skip(f"{method} starts from {result.config.init}")
    images, labels, labels_soft = result.syn.decoded()
    protocol = dataclasses.replace(
        get_method(method).eval_protocol(result.config), models=("convnet(width=16)",),
        num_eval=1, epochs=100, augmentation="none")
    evaluation = evaluate_images(images, labels, digits_splits, protocol=protocol,
                                 device="cpu", seed=0, labels_soft=labels_soft)
    accuracy = evaluation.scores["convnet(width=16)"].mean
    assert 20.0 < accuracy <= 100.0, f"{method}: {accuracy:.1f} %"


def test_an_infinite_option_is_refused_by_name():
    """1e400 in YAML or --set reads as infinity; it must not reach a run (its JSON record
    cannot hold it)."""
    from ddsuite.core.errors import ConfigError
    from ddsuite.core.methods import config_from_dict

    with pytest.raises(ConfigError, match="diversity_weight must be a finite number, got inf"):
        config_from_dict(get_method("haba").Config, {"ipc": 1, "diversity_weight": 1e400})
    with pytest.raises(ConfigError, match="lr_images must be a finite number, got -inf"):
        config_from_dict(get_method("dm").Config, {"ipc": 1, "lr_images": -1e400})
    with pytest.raises(ConfigError, match=r"lr_images must be a finite number, got 1e\+308 "
                                          r"\(at most 3.4e\+38"):
        config_from_dict(get_method("haba").Config, {"ipc": 1, "lr_images": 1e308})
