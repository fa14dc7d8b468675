"""Tests of the parameterised-set methods: IDC's multi-formation mosaics, HaBa's bases and
hallucinators.

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
from ddsuite.core.methods.haba import hallucination_similarity
from ddsuite.core.synthetic.decode import decode_problems, decode_set, partition_expand
from ddsuite.core.synthetic.hallucinate import Hallucinators

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


# -- HaBa: bases and hallucinators -----------------------------------------------------------

HABA = {"ipc": 1, "iterations": 2, "model": "convnet(width=8)", "num_experts": 1,
        "expert_epochs_train": 4, "syn_steps": 3, "max_start_epoch": 2, "expert_epochs": 2,
        "hallucinators": 3, "hallucinator_channels": 2}


@pytest.fixture(scope="module")
def haba_run(digits_splits, tmp_path_factory):
    root = tmp_path_factory.mktemp("haba")
    config = {**HABA, "experts_dir": str(root / "experts"), "lr_hallucinators": 0.1}
    result = distill("haba", splits=digits_splits, config=config, seed=0, out_dir=root / "run")
    return result, root / "run", config


def test_each_base_decodes_to_one_image_per_hallucinator_in_base_order():
    torch.manual_seed(0)
    module = Hallucinators(4, image_channels=3, channels=2)
    bases = torch.randn(5, 3, 6, 6)
    images = module(bases)
    assert tuple(images.shape) == (20, 3, 6, 6)
    # hallucinator j alone, applied to base i, is row i * 4 + j
    alone = module(bases[2:3])
    torch.testing.assert_close(images[8:12], alone)
    with torch.no_grad():
        module.decoder_weight.zero_()
        module.decoder_bias.zero_()
    torch.testing.assert_close(module(bases), bases.repeat_interleave(4, dim=0))


def test_similarity_penalty_is_one_for_copies_and_zero_for_orthogonal_hallucinations():
    copies = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert float(hallucination_similarity(copies, 3)) == pytest.approx(1.0)
    orthogonal = torch.eye(3)
    assert float(hallucination_similarity(orthogonal, 3)) == pytest.approx(0.0)


def test_haba_learns_bases_and_hallucinators_and_its_artifact_counts_both(haba_run,
                                                                          digits_splits):
    result, folder, config = haba_run
    artifact = load_artifact(folder)
    meta = artifact.meta
    assert meta["decode"] == {"kind": "hallucinate", "count": 3, "channels": 2}
    assert meta["decoded_ipc"] == 3 and meta["family"] == "parameterised sets"
    decoder_keys = sorted(k for k in artifact.tensors if k.startswith("decoder."))
    assert len(decoder_keys) == 6
    assert meta["size_bytes"] == sum(t.numel() * t.element_size()
                                     for t in artifact.tensors.values())
    assert meta["storage_ipc"] > 1  # bases plus the hallucinators' weights
    images, labels, _ = artifact.decoded()
    assert tuple(images.shape) == (30, 1, 8, 8)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(3))
    torch.testing.assert_close(images, result.syn.decoded()[0].cpu())
    # both the bases and the hallucinators moved away from the seeded start
    fresh = get_method("haba")(result.config, splits=digits_splits, device="cpu")
    start = fresh.initialize(torch.Generator().manual_seed(0))
    assert not torch.equal(start.images_syn.detach(), artifact.images_syn)
    assert any(not torch.equal(v, artifact.tensors[k])
               for k, v in start.decoder.tensors().items())


def test_resuming_a_finished_haba_run_returns_the_decoding_set(haba_run, digits_splits):
    result, folder, config = haba_run
    again = distill("haba", splits=digits_splits, config=config, seed=0, out_dir=folder,
                    resume=True)
    assert again.syn.decode == result.syn.decode
    torch.testing.assert_close(again.syn.decoded()[0].cpu(), result.syn.decoded()[0].cpu())


def test_hallucinator_tensors_are_checked_against_the_decode_record():
    module = Hallucinators(2, image_channels=1, channels=3)
    tensors = {"images_syn": torch.zeros(10, 1, 8, 8), **module.tensors()}
    decode = {"kind": "hallucinate", "count": 2, "channels": 3}
    assert decode_problems(decode, (1, 8, 8), tensors) == []
    assert "count must be an integer >= 1" in decode_problems(
        {**decode, "count": 0}, (1, 8, 8), tensors)[0]
    wrong = decode_problems({**decode, "channels": 4}, (1, 8, 8), tensors)
    assert any("decoder.encoder_weight" in p and "expected" in p for p in wrong)
    missing = {k: v for k, v in tensors.items() if k != "decoder.scale"}
    assert "decoder.scale is missing" in " ".join(decode_problems(decode, (1, 8, 8), missing))
    with pytest.raises(ValueError, match="needs the stored tensors"):
        decode_set(tensors["images_syn"], torch.zeros(10, dtype=torch.int64), decode=decode)


def test_a_haba_upload_carries_its_hallucinators_and_counts_their_bytes(haba_run):
    from ddsuite.applications.federated import Payload, payload_problems

    result, folder, _ = haba_run
    artifact = load_artifact(folder)
    decoder = {k: v for k, v in artifact.tensors.items() if k.startswith("decoder.")}
    payload = Payload(client=0, images_syn=artifact.images_syn, labels_syn=artifact.labels_syn,
                      decode=artifact.decode, decoder=decoder)
    assert payload_problems(payload, image_shape=(1, 8, 8), num_classes=10) == []
    stored = artifact.images_syn.numel() * 4 + artifact.labels_syn.numel() * 8
    assert payload.num_bytes == stored + sum(v.numel() * 4 for v in decoder.values())
    without = Payload(client=0, images_syn=artifact.images_syn, labels_syn=artifact.labels_syn,
                      decode=artifact.decode)
    assert any("missing" in p for p in payload_problems(without, image_shape=(1, 8, 8),
                                                        num_classes=10))
    pytest.importorskip("flwr")
    from ddsuite.applications.federated.flower import decode_reply, encode_reply

    back = decode_reply(encode_reply(payload))
    assert back.decode == payload.decode and back.num_bytes == payload.num_bytes
    for key, value in decoder.items():
        assert torch.equal(back.decoder[key], value)


def test_decoding_hallucinations_leaves_the_global_rng_alone():
    """Evaluation decodes sets between seeded steps; rebuilding the hallucinators must not
    consume random numbers (the throwaway initialisation runs on a forked RNG)."""
    module = Hallucinators(2, image_channels=1, channels=3)
    tensors = {"images_syn": torch.randn(10, 1, 8, 8), **module.tensors()}
    decode = {"kind": "hallucinate", "count": 2, "channels": 3}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    images, _, _ = decode_set(tensors["images_syn"], torch.arange(10), decode=decode,
                              tensors=tensors)
    assert torch.equal(torch.rand(3), expected)
    torch.testing.assert_close(images, module(tensors["images_syn"]).detach())
