"""Tests of the distribution-matching family beside DM: CAFE, IDM and DataDAM.

The maths (attention maps, partition/expansion, the CAFE losses) is checked on hand-made
tensors; each method also runs a short distillation on digits, whose loss must fall.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddsuite.core.data.real import RealDataset
from ddsuite.core.engine import Callback, distill
from ddsuite.core.errors import ConfigError, NonFiniteError, UnsupportedFeatureError
from ddsuite.core.methods import config_from_dict, get_method
from ddsuite.core.methods.cafe import (
    CAFE,
    CAFEConfig,
    discrimination_loss,
    layer_alignment_loss,
)
from ddsuite.core.methods.datadam import (
    DataDAMConfig,
    attention_map,
    attention_matching_loss,
)
from ddsuite.core.methods.idm import IDM, IDMConfig, partition_compose, partition_expand
from ddsuite.core.models import build_model
from ddsuite.core.models.features import intermediate_features
from ddsuite.core.synthetic.artifact import is_artifact

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FAMILY = ("cafe", "idm", "datadam")
SMALL = "convnet(width=16)"


class Losses(Callback):
    def __init__(self):
        self.metrics: list[dict[str, float]] = []

    def on_step(self, ctx, metrics) -> None:
        self.metrics.append(dict(metrics))


def _digits_net(spec: str = SMALL) -> nn.Module:
    torch.manual_seed(0)
    return build_model(spec, in_channels=1, num_classes=10, image_size=(8, 8), device="cpu")


# -- registration and defaults ---------------------------------------------------------------


@pytest.mark.parametrize("method", FAMILY)
def test_registered_in_the_distribution_matching_family(method):
    cls = get_method(method)
    assert cls.family == "distribution matching"


@pytest.mark.parametrize("ipc, weight, steps", [(1, 0.5, 100), (10, 0.5, 600), (50, 0.1, 600),
                                                 (30, 0.3, 600), (200, 0.1, 600)])
def test_idm_defaults_follow_and_interpolate_the_published_anchors(ipc, weight, steps):
    config = IDMConfig(ipc=ipc).resolve(dataset="cifar10")
    assert config.ce_weight == pytest.approx(weight)
    assert config.max_train_steps == steps
    assert (config.iterations, config.lr_images, config.factor) == (20000, 0.2, 2)


def test_datadam_image_lr_interpolates_between_low_and_high_ipc():
    lrs = [DataDAMConfig(ipc=ipc).resolve(dataset="cifar10").lr_images for ipc in (1, 50, 75,
                                                                                   100, 500)]
    assert lrs == pytest.approx([1.0, 1.0, 5.5, 10.0, 10.0])


def test_cafe_loops_and_lr_schedule():
    config = CAFEConfig(ipc=10).resolve(dataset="cifar10")
    assert (config.outer_loop, config.inner_loop, config.iterations) == (10, 50, 2000)
    assert config.layer_weights == (1.0, 1.0, 0.1, 0.1)
    cafe = object.__new__(CAFE)  # only the schedule is needed, not the data
    cafe.config = config
    lrs = [cafe._lr_images(i) for i in (0, 1199, 1200, 1600, 1800, 1999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125, 0.0125])


# -- intermediate features -------------------------------------------------------------------


def test_intermediate_features_of_convnet_are_the_blocks_before_pooling():
    net = _digits_net()
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    maps, embedding = intermediate_features(net, x)
    assert [tuple(m.shape) for m in maps] == [(5, 16, 12, 12), (5, 16, 6, 6), (5, 16, 3, 3)]
    torch.testing.assert_close(embedding, net.embed(x))
    maps[0].sum().backward()  # still in the graph
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not m._forward_hooks for m in net.modules()), "hooks were left behind"


@pytest.mark.parametrize("spec, dims", [("lenet", [4, 4, 2, 2]), ("mlp", [2, 2]),
                                         ("resnet18", [4] * 17)])
def test_intermediate_features_of_other_native_models(spec, dims):
    net = _digits_net(spec)
    maps, embedding = intermediate_features(net, torch.randn(3, 1, 8, 8))
    assert [m.ndim for m in maps] == dims
    assert embedding.shape == (3, net.feature_dim)


def test_intermediate_features_refuse_a_model_without_activation_modules():
    class Linear(nn.Module):
        feature_dim = 4

        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 4)

        def embed(self, x):
            return torch.relu(self.body(x.flatten(1)))  # functional: invisible to hooks

    with pytest.raises(UnsupportedFeatureError, match="no activation module"):
        intermediate_features(Linear(), torch.randn(2, 1, 8, 8))


# -- DataDAM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0])
def test_attention_map_is_unit_norm_and_invariant_to_feature_scaling(power):
    features = torch.randn(6, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    a = attention_map(features, power=power)
    assert a.shape == (6, 25)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(6))
    for scale in (1e-3, 7.0, 1e3):
        torch.testing.assert_close(attention_map(scale * features, power=power), a,
                                   rtol=1e-4, atol=1e-6)
    # It is a spatial map: moving the energy elsewhere changes it.
    shifted = torch.roll(features, shifts=2, dims=-1)
    assert not torch.allclose(attention_map(shifted, power=power), a)


def test_attention_matching_loss_is_zero_only_for_matching_class_means():
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(3 * 4, 8, 6, 6, generator=g), torch.randn(3 * 4, 8, 3, 3, generator=g)]
    same = attention_matching_loss(maps, [m * 2.5 for m in maps], classes=3, power=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-8)
    other = [torch.randn(m.shape, generator=g) for m in maps]
    assert float(attention_matching_loss(maps, other, classes=3, power=1.0)) > 1e-4


# -- CAFE ------------------------------------------------------------------------------------


def _clustered(classes: int = 4, n: int = 32, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=g)
    feats = centres.repeat_interleave(n, dim=0) + torch.randn(classes * n, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n)
    return feats, labels


def test_cafe_discrimination_loss_is_lowest_with_the_real_class_means_as_centres():
    feats, labels = _clustered()
    means = feats.view(4, 32, -1).mean(dim=1)
    best = discrimination_loss(feats, means, labels)
    permuted = discrimination_loss(feats, means[[1, 2, 3, 0]], labels)
    noise = discrimination_loss(feats, torch.randn(4, 8, generator=torch.Generator()
                                                   .manual_seed(5)), labels)
    assert float(best) < float(permuted) and float(best) < float(noise)
    assert float(best) < 0.1 * float(permuted)


def test_cafe_layer_alignment_weights_each_layer_and_repeats_the_last_weight():
    g = torch.Generator().manual_seed(2)
    real = [torch.randn(2 * 3, 4, generator=g) for _ in range(3)]
    syn = [torch.randn(2 * 2, 4, generator=g) for _ in range(3)]
    gaps = [float(layer_alignment_loss([r], [s], classes=2, weights=(1.0,)))
            for r, s in zip(real, syn)]
    total = layer_alignment_loss(real, syn, classes=2, weights=(1.0, 0.5))
    assert float(total) == pytest.approx(gaps[0] + 0.5 * gaps[1] + 0.5 * gaps[2], rel=1e-5)
    assert float(layer_alignment_loss(real, real, classes=2, weights=(1.0,))) == 0.0


# -- IDM -------------------------------------------------------------------------------------


def test_partition_expand_shapes_order_and_tile_content():
    # Two 1x4x4 images whose quadrants are constants 1..4 and 5..8.
    quadrants = torch.arange(1.0, 9.0).view(2, 1, 2, 2)
    images = quadrants.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 1, 4, 4)
    out = partition_expand(images, 2)
    assert out.shape == (8, 1, 4, 4)
    expected = torch.arange(1.0, 9.0).view(8, 1, 1, 1).expand(8, 1, 4, 4)
    torch.testing.assert_close(out, expected)  # image-major, tiles row by row
    assert partition_expand(images, 1) is images
    assert partition_expand(torch.randn(3, 3, 8, 8), 4).shape == (48, 3, 8, 8)


def test_partition_compose_inverts_the_tiling():
    images = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    tiles = images.reshape(3, 2, 2, 3, 2, 3).permute(0, 2, 4, 1, 3, 5).reshape(12, 2, 3, 3)
    torch.testing.assert_close(partition_compose(tiles, 2), images)
    # Expansion of a composed mosaic gives back each tile, upsampled.
    up = partition_expand(partition_compose(tiles, 2), 2)
    torch.testing.assert_close(
        up, nn.functional.interpolate(tiles, size=(6, 6), mode="bilinear",
                                      align_corners=False))


def _idm(digits_splits, **options) -> tuple[IDM, object]:
    data = {"ipc": 1, "model": "convnet(width=8)", "batch_real": 8, "batch_train": 32,
            "iterations": 10, **options}
    config = config_from_dict(IDMConfig, data).resolve(dataset="digits")
    torch.manual_seed(0)
    distiller = IDM(config, splits=digits_splits, device="cpu")
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    distiller.setup(syn)
    return distiller, syn


def test_idm_initial_images_are_mosaics_of_downscaled_real_images(digits_splits):
    distiller, syn = _idm(digits_splits)
    assert syn.images_syn.shape == (10, 1, 8, 8)
    train = digits_splits.train
    small = nn.functional.avg_pool2d(train.images, 2).flatten(1)  # (N, 16)
    tiles = syn.images_syn.detach().reshape(10, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5)
    for c, image_tiles in enumerate(tiles.reshape(10, 4, 16)):
        for tile in image_tiles:
            match = (small - tile).abs().amax(dim=1) < 1e-5
            assert match.any() and c in train.labels[match].tolist()


def test_idm_pool_networks_train_and_reset_after_max_steps(digits_splits):
    distiller, syn = _idm(digits_splits, pool_size=1, train_models=1, train_steps=2,
                          max_train_steps=4)
    generator = torch.Generator().manual_seed(0)
    distiller.step(syn, iteration=0, generator=generator)
    first = distiller.pool[0]
    assert first is not None and first.steps == 2 and first.seen == 64
    before = [p.detach().clone() for p in first.net.parameters()]
    distiller.step(syn, iteration=1, generator=generator)
    assert distiller.pool[0] is first and first.steps == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, first.net.parameters()))
    distiller.step(syn, iteration=2, generator=generator)  # worn out: replaced, then trained
    fresh = distiller.pool[0]
    assert fresh is not first and fresh.steps == 2 and fresh.seen == 64


def test_idm_pool_survives_a_checkpoint_round_trip(digits_splits, tmp_path):
    distiller, syn = _idm(digits_splits, pool_size=3, train_models=2, train_steps=1)
    generator = torch.Generator().manual_seed(0)
    for iteration in range(3):
        distiller.step(syn, iteration=iteration, generator=generator)
    torch.save(distiller.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # as the engine loads it
    restored, _ = _idm(digits_splits, pool_size=3, train_models=2, train_steps=1)
    restored.load_state_dict(state)
    for old, new in zip(distiller.pool, restored.pool):
        assert (old is None) == (new is None)
        if old is not None:
            assert (old.steps, old.correct, old.seen) == (new.steps, new.correct, new.seen)
            for a, b in zip(old.net.parameters(), new.net.parameters()):
                assert torch.equal(a, b)


def test_idm_set_decodes_only_when_partitioned(digits_splits):
    _, tiled = _idm(digits_splits, pool_size=2)
    assert tiled.decode == {"kind": "partition-expand", "factor": 2}
    _, plain = _idm(digits_splits, pool_size=2, factor=1)
    assert plain.decode is None


# -- whole runs on digits --------------------------------------------------------------------

SHORT_RUN = {
    "cafe": {"outer_loop": 2, "inner_loop": 1, "lr_images": 1.0},
    # Untrained pool networks keep the loss comparable from one iteration to the next (a
    # trained network's features grow); the pool's training is tested above.
    "idm": {"pool_size": 2, "train_models": 0, "ce_weight": 0.0, "lr_images": 3.0},
    "datadam": {},
}


@pytest.mark.parametrize("method", FAMILY)
def test_matching_loss_falls_during_a_short_run(digits_splits, method):
    config = {"ipc": 2, "iterations": 25, "model": SMALL, "batch_real": 32, "init": "noise",
              **SHORT_RUN[method]}
    losses = Losses()
    distill(method, splits=digits_splits, config=config, seed=0, callbacks=[losses])
    key = "loss_match" if method == "idm" else "loss"
    values = [m[key] for m in losses.metrics]
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < 0.7 * first, (method, values)


@pytest.mark.parametrize("method", FAMILY)
def test_non_finite_loss_stops_the_run_and_saves_nothing(digits_splits, method, monkeypatch,
                                                         tmp_path):
    def poisoned(self, n, *, generator):
        return torch.full((self.num_classes, n, *self.image_shape), float("nan"))

    monkeypatch.setattr(RealDataset, "sample_per_class", poisoned)
    config = {"ipc": 1, "iterations": 3, "model": SMALL, "batch_real": 8, "init": "noise",
              **SHORT_RUN[method]}
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="iteration 0"):
        distill(method, splits=digits_splits, config=config, seed=0, out_dir=out,
                checkpoint_every=1)
    assert not is_artifact(out)
    assert not (out / "checkpoint.pt").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("method, options, words", [
    ("datadam", {"power": 0, "weight_attention": -1}, ["power must be > 0",
                                                       "weight_attention must be >= 0"]),
    ("cafe", {"outer_loop": 0, "layer_weights": [1, -2], "lr_milestones": [1.5]},
     ["outer_loop must be >= 1", "layer_weights must all be >= 0", "strictly between 0 and 1"]),
    ("idm", {"factor": 0, "pool_size": 0, "match_models": 2, "ce_weight": -1},
     ["factor must be >= 1", "pool_size must be >= 1", "match_models (2) must be <= pool_size",
      "ce_weight must be >= 0"]),
])
def test_invalid_options_are_all_reported_with_what_is_allowed(digits_splits, method, options,
                                                               words):
    with pytest.raises(ConfigError) as info:
        distill(method, splits=digits_splits, config={"ipc": 1, **options}, seed=0)
    for word in words:
        assert word in str(info.value)


def test_idm_factor_must_divide_the_image_side(digits_splits):
    with pytest.raises(ConfigError, match="allowed: 1, 2, 4, 8"):
        distill("idm", splits=digits_splits, config={"ipc": 1, "factor": 3}, seed=0)


def test_datadam_refuses_a_model_without_spatial_maps(digits_splits):
    with pytest.raises(UnsupportedFeatureError, match="weight_attention=0"):
        distill("datadam", splits=digits_splits, config={"ipc": 1, "iterations": 1,
                                                        "model": "mlp"}, seed=0)
    result = distill("datadam", splits=digits_splits, seed=0,
                     config={"ipc": 1, "iterations": 2, "model": "mlp", "weight_attention": 0})
    assert torch.isfinite(result.syn.images_syn).all()


class InterruptAt(Callback):
    """Raises KeyboardInterrupt once iteration `at` is done, as Ctrl-C would."""

    def __init__(self, at: int):
        self.at = at

    def on_step(self, ctx, metrics) -> None:
        if ctx.iteration == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", FAMILY)
def test_interrupted_run_resumes_to_the_same_set(digits_splits, method, tmp_path):
    """IDM's pool, CAFE's lr schedule and DataDAM's draws all come back on resume."""
    config = {"ipc": 1, "iterations": 4, "model": "convnet(width=8)", "batch_real": 8,
              **SHORT_RUN[method]}
    if method == "idm":
        config.update(train_models=1, ce_weight=0.5)  # the pool trains and weighs the CE
    if method == "cafe":
        config.update(lr_milestones=[0.5])  # the image lr halves between the two halves
    whole = distill(method, splits=digits_splits, config=config, seed=0)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(method, splits=digits_splits, config=config, seed=0, out_dir=out,
                checkpoint_every=2, callbacks=[InterruptAt(3)])
    resumed = distill(method, splits=digits_splits, config=config, seed=0, out_dir=out,
                      checkpoint_every=2, resume=True)
    torch.testing.assert_close(resumed.syn.images_syn, whole.syn.images_syn)
    again = distill(method, splits=digits_splits, config=config, seed=0, out_dir=out,
                    resume=True)  # a finished run is recognised, not refused
    torch.testing.assert_close(again.syn.images_syn.cpu(), whole.syn.images_syn)
