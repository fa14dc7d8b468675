"""Tests of the parameterised-set methods: IDC's multi-formation mosaics.

The released defaults, the choice of matched gradients and the mosaic start are checked
directly; a short run on digits must store mosaics, record how they decode, and evaluate on
the decoded images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddsuite.core.engine import distill
from ddsuite.core.errors import ConfigError
from ddsuite.core.methods import config_from_dict, get_method
from ddsuite.core.methods.gradient_matching import gradient_distance, per_class_gradients
from ddsuite.core.methods.idc import IDC, IDCConfig, _matched
from ddsuite.core.models import build_model
from ddsuite.core.synthetic import load_artifact
from ddsuite.core.synthetic.decode import partition_expand

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SMALL = "convnet(width=16)"


def test_idc_is_registered_as_a_parameterised_set_method():
    cls = get_method("idc")
    assert cls is IDC
    assert cls.family == "parameterised sets"


@pytest.mark.parametrize("dataset, distance, lr10, augmentation, n_data", [
    ("mnist", "l1", 1e-4, "color_crop", 500),
    ("Fashion-MNIST", "l1", 1e-4, "color_crop", 500),
    ("cifar10", "mse", 5e-3, "color_crop_cutout", 2000),
    ("svhn", "mse", 5e-3, "color_crop_cutout", 500),
])
@pytest.mark.parametrize("ipc", [1, 10, 50])
def test_idc_defaults_follow_the_released_settings(dataset, distance, lr10, augmentation,
                                                   n_data, ipc):
    config = IDCConfig(ipc=ipc).resolve(dataset=dataset)
    assert config.distance == distance
    assert config.lr_images == pytest.approx(lr10 * ipc / 10)
    assert config.augmentation == augmentation
    assert config.n_data == n_data
    assert (config.iterations, config.inner_loop, config.factor) == (2000, 100, 2)
    assert config.batch_real == 64 and config.batch_syn_max == 128


def test_idc_keeps_cutout_on_digits_without_multi_formation_and_evaluates_without_flip():
    config = IDCConfig(factor=1).resolve(dataset="mnist")
    assert config.augmentation == "color_crop_cutout"
    assert "flip" not in config.eval_augmentation
    assert "flip" in IDCConfig().resolve(dataset="cifar10").eval_augmentation
    assert IDC.eval_protocol(config).augmentation == config.eval_augmentation


def test_idc_needs_an_image_lr_for_a_distance_without_a_published_one():
    with pytest.raises(ConfigError, match="lr_images.*layerwise-cosine"):
        IDCConfig(distance="layerwise-cosine").resolve(dataset="mnist")
    config = IDCConfig(distance="layerwise-cosine", lr_images=0.1).resolve(dataset="mnist")
    assert config.lr_images == 0.1


def test_idc_invalid_options_are_all_reported():
    config = IDCConfig(factor=0, inner_loop=0, n_data=-1, lr_net=0, distance="l3")
    problems = config.problems()
    for name in ("factor", "inner_loop", "n_data", "lr_net", "distance"):
        assert any(p.startswith(name) for p in problems), (name, problems)


def test_idc_factor_must_divide_the_image_side(digits_splits):
    config = config_from_dict(IDCConfig, {"ipc": 1, "factor": 3, "model": SMALL})
    with pytest.raises(ConfigError, match="factor=3 does not divide 8x8.*allowed: 1, 2, 4, 8"):
        IDC(config.resolve(dataset="digits"), splits=digits_splits, device="cpu")


def test_only_convolution_weights_are_matched_unless_the_classifier_is_asked_for():
    torch.manual_seed(0)
    net = build_model(SMALL, in_channels=1, num_classes=10, image_size=(8, 8), device="cpu")
    grads = per_class_gradients(net, torch.randn(10, 2, 1, 8, 8), create_graph=False)
    shapes = dict(net.named_parameters())
    conv = {n for n, p in shapes.items() if p.ndim == 4}
    linear = {n for n, p in shapes.items() if p.ndim == 2}
    assert conv and linear
    assert set(_matched(grads, classifier=False)) == conv
    assert set(_matched(grads, classifier=True)) == conv | linear


def test_idc_starts_from_mosaics_of_downscaled_real_images_of_the_class(digits_splits):
    config = config_from_dict(IDCConfig, {"ipc": 2, "model": SMALL}).resolve(dataset="digits")
    distiller = IDC(config, splits=digits_splits, device="cpu")
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    assert syn.decode == {"kind": "partition-expand", "factor": 2}
    train = digits_splits.train
    small_real = F.avg_pool2d(train.images, kernel_size=2)  # (N, 1, 4, 4)
    tiles = syn.images_syn.detach().reshape(-1, 1, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(-1, 1, 4, 4)  # four tiles per stored image, class-major
    for i, tile in enumerate(tiles):
        label = int(syn.labels_syn[i // 4])
        distance = (small_real - tile).flatten(1).norm(dim=1)
        nearest = int(distance.argmin())
        assert distance[nearest] < 1e-5
        assert int(train.labels[nearest]) == label


def test_idc_run_stores_mosaics_and_its_artifact_decodes_to_four_times_the_images(
        digits_splits, tmp_path):
    config = {"ipc": 1, "iterations": 2, "inner_loop": 2, "model": SMALL, "n_data": 64,
              "batch_real": 16}
    result = distill("idc", splits=digits_splits, config=config, seed=0, out_dir=tmp_path / "r")
    artifact = load_artifact(tmp_path / "r")
    stored = artifact.images_syn
    assert tuple(stored.shape) == (10, 1, 8, 8)
    assert artifact.meta["decoded_ipc"] == 4
    assert artifact.meta["size_bytes"] >= stored.numel() * stored.element_size()
    images, labels, _ = artifact.decoded()
    assert tuple(images.shape) == (40, 1, 8, 8)
    torch.testing.assert_close(images, partition_expand(stored, 2))
    assert torch.equal(labels, torch.arange(10).repeat_interleave(4))
    assert not torch.equal(result.syn.images_syn.detach().cpu(),
                           IDC(result.config, splits=digits_splits, device="cpu")
                           .initialize(torch.Generator().manual_seed(0)).images_syn.detach())


def test_one_image_update_lowers_the_matching_loss_on_the_same_network_and_batch(
        digits_splits):
    """The gradient step on the images is a descent step of IDC's objective."""
    config = config_from_dict(IDCConfig, {"ipc": 1, "model": SMALL, "augmentation": "none",
                                          "lr_images": 1e-3, "momentum": 0.0})
    distiller = IDC(config.resolve(dataset="digits"), splits=digits_splits, device="cpu")
    syn = distiller.initialize(torch.Generator().manual_seed(0))
    distiller.setup(syn)
    torch.manual_seed(1)
    net = build_model(SMALL, in_channels=1, num_classes=10, image_size=(8, 8), device="cpu")
    real = digits_splits.train.sample_per_class(16, generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        images = partition_expand(syn.images_syn, 2).view(10, 4, 1, 8, 8)
        g_real = per_class_gradients(net, real, create_graph=False)
        g_syn = per_class_gradients(net, images, create_graph=True)
        return gradient_distance(_matched(g_real, classifier=False),
                                 _matched(g_syn, classifier=False), distance="l1")

    before = loss()
    distiller.update_images(before, iteration=0)
    after = loss()
    assert float(after.detach()) < float(before.detach())


def test_idc_refuses_a_model_without_convolutions_unless_the_classifier_is_matched(
        digits_splits):
    config = config_from_dict(IDCConfig, {"ipc": 1, "model": "mlp"}).resolve(dataset="digits")
    with pytest.raises(ConfigError, match="no convolution weights.*match_classifier"):
        IDC(config, splits=digits_splits, device="cpu")
    IDC(config_from_dict(IDCConfig, {"ipc": 1, "model": "mlp", "match_classifier": True})
        .resolve(dataset="digits"), splits=digits_splits, device="cpu")


def test_a_nas_proxy_made_with_idc_trains_on_the_decoded_images(digits_splits):
    pytest.importorskip("nni")
    from ddsuite.applications.nas.proxy import make_proxy

    proxy = make_proxy("idc", digits_splits, ipc=1, seed=0, device="cpu",
                       config={"iterations": 1, "inner_loop": 1, "n_data": 32, "model": SMALL})
    assert tuple(proxy.images.shape) == (40, 1, 8, 8)  # 10 mosaics, 4 tiles each
    assert torch.equal(proxy.labels.cpu(), torch.arange(10).repeat_interleave(4))
