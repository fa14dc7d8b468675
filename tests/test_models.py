"""Tests of ddsuite.core.models: every native model on three input shapes, specs, torch.func."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ddsuite.core.errors import (
    ConfigError,
    DuplicateNameError,
    UnknownNameError,
    UnsupportedFeatureError,
)
from ddsuite.core.models import (
    MLP,
    ModelSpec,
    build_model,
    list_models,
    parse_model_spec,
    register_model,
    split_model_list,
)
from ddsuite.core.models import registry as model_registry
from ddsuite.core.models.norm import NORMS
from ddsuite.core.registry import Registry

NATIVE_MODELS = [name for name in list_models() if not name.startswith("tv:")]
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}
NUM_CLASSES = 10
BATCH = 2
NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)

# The field's feature sizes (digits, MNIST, CIFAR), per family; aliases share their family's.
FEATURE_DIMS = {
    family: dict(zip(SHAPES.values(), dims))
    for family, dims in {
        "convnet": (128, 128 * 4 * 4, 128 * 4 * 4),  # digits: 8 -> 12 -> 6 -> 3 -> 1
        "mlp": (128, 128, 128),
        "lenet": (84, 84, 84),
        "alexnet": (192, 192 * 4 * 4, 192 * 4 * 4),
        "vgg11": (512, 512, 512),
        "resnet18": (512, 512, 512),
    }.items()
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _build(spec: str, shape: tuple[int, int, int], device: torch.device) -> nn.Module:
    return build_model(
        spec, in_channels=shape[0], num_classes=NUM_CLASSES, image_size=shape[1:], device=device
    )


def test_native_models_are_all_registered() -> None:
    expected = {
        "convnet", "convnet-bn", "convnet-ln", "convnet-gn", "convnet-nn", "mlp", "lenet",
        "alexnet", "alexnet-bn", "vgg11", "vgg11-bn", "resnet18", "resnet18-bn",
    }
    assert set(NATIVE_MODELS) == expected
    assert list_models()[-1] == "tv:<torchvision name>"


# --- every native model on every input shape -------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_shapes_finiteness_and_gradients(name: str, shape: tuple[int, int, int], device) -> None:
    model = _build(name, shape, device)
    x = torch.randn(BATCH, *shape, device=device)  # (B, C, H, W)
    labels = torch.arange(BATCH, device=device) % NUM_CLASSES

    logits = model(x)  # (B, classes)
    feats = model.embed(x)  # (B, feature_dim)
    F.cross_entropy(logits, labels).backward()

    assert model.feature_dim == FEATURE_DIMS[name.split("-")[0]][shape]
    assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert feats.shape == (BATCH, model.feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(feats).all()
    torch.testing.assert_close(model.classifier(feats), logits)

    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # A weight whose gradient vanishes is cut off from the loss, e.g. by a per-channel norm
    # over a single pixel (seen at ~1e-24; healthy weights here are above 1e-4). Biases are
    # exempt: a conv bias followed by a norm is cancelled by the norm, so its gradient is ~0.
    vanishing = [
        n for n, p in model.named_parameters() if p.ndim > 1 and p.grad.abs().max() < 1e-6
    ]
    assert not vanishing, f"vanishing gradient for {vanishing}"


def test_build_model_honours_the_device() -> None:
    model = build_model(
        "resnet18", in_channels=3, num_classes=10, image_size=(32, 32), device="meta"
    )
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} <= {"meta"}


# --- field conventions ----------------------------------------------------------------------


def test_convnet_pads_single_channel_input_to_32(device) -> None:
    model = _build("convnet", SHAPES["mnist"], device)
    first_conv = model.features[0]
    maps = model.features(torch.randn(2, 1, 28, 28))  # (B, 128, 4, 4)

    assert first_conv.padding == (3, 3)
    assert maps.shape == (2, 128, 4, 4)
    assert model.feature_dim == 128 * 4 * 4 == 2048


def test_convnet_feature_sizes_follow_the_input(device) -> None:
    cifar = _build("convnet", SHAPES["cifar"], device)
    digits = _build("convnet", SHAPES["digits"], device)  # 8 -> 12 -> 6 -> 3 -> 1
    no_pool = _build("convnet(depth=2,width=16,pool=none)", SHAPES["cifar"], device)

    assert cifar.features[0].padding == (1, 1)
    assert cifar.feature_dim == 2048
    assert digits.feature_dim == 128
    assert no_pool.feature_dim == 16 * 32 * 32


def test_convnet_too_deep_for_image_raises(device) -> None:
    with pytest.raises(ConfigError, match=r"depth=4.*8x8"):
        _build("convnet(depth=4)", SHAPES["digits"], device)


@pytest.mark.parametrize(
    ("spec", "layer_type", "groups"),
    [
        ("convnet(width=64)", nn.GroupNorm, 64),
        ("convnet-bn", nn.BatchNorm2d, None),
        ("convnet-ln", nn.LayerNorm, None),
        ("convnet-gn", nn.GroupNorm, 4),
        ("convnet-bn(norm=layer)", nn.LayerNorm, None),
    ],
)
def test_convnet_norm_layers(spec: str, layer_type: type, groups: int | None, device) -> None:
    model = _build(spec, SHAPES["cifar"], device)
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert len(norms) == 3
    assert all(type(m) is layer_type for m in norms)
    if groups is not None:
        assert all(m.num_groups == groups and m.affine for m in norms)


def test_convnet_without_norm_has_no_norm_layer(device) -> None:
    model = _build("convnet-nn", SHAPES["cifar"], device)
    assert not any(isinstance(m, NORM_TYPES) for m in model.modules())


def test_convnet_activation_and_pool_options(device) -> None:
    model = _build("convnet(act=leakyrelu,pool=max,depth=2)", SHAPES["cifar"], device)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    sigmoid = _build("convnet(act=sigmoid)", SHAPES["cifar"], device)

    assert len(acts) == 2 and all(m.negative_slope == 0.01 for m in acts)
    assert len(pools) == 2 and model.feature_dim == 128 * 8 * 8
    assert sum(isinstance(m, nn.Sigmoid) for m in sigmoid.modules()) == 3


def test_mlp_options(device) -> None:
    model = _build("mlp(width=32,depth=3,act=sigmoid)", SHAPES["digits"], device)
    assert model.feature_dim == 32
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 4
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3


def test_lenet_matches_the_field_on_mnist(device) -> None:
    model = _build("lenet", SHAPES["mnist"], device)
    assert model.features[0].padding == (2, 2)
    assert model.fc[0].in_features == 16 * 5 * 5


# --- specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "convnet",
        "convnet(depth=4,width=64,norm=batch,act=sigmoid,pool=max)",
        "mlp(width=32)",
        "tv:resnet18",
        "custom(lr=0.001,flag=true,scale=-2.5e-05,name=abc)",
    ],
)
def test_spec_round_trip(text: str) -> None:
    spec = parse_model_spec(text)
    assert parse_model_spec(str(spec)) == spec
    assert str(parse_model_spec(str(spec))) == str(spec)


def test_spec_values_are_typed_and_order_free() -> None:
    spec = parse_model_spec(" ConvNet( width = 64 , depth=4, lr=0.5, flag=false, norm=batch ) ")
    assert spec.name == "convnet"
    assert spec.kwargs == {"width": 64, "depth": 4, "lr": 0.5, "flag": False, "norm": "batch"}
    assert type(spec.kwargs["depth"]) is int and type(spec.kwargs["lr"]) is float
    assert spec == parse_model_spec("convnet(depth=4,flag=false,lr=0.5,norm=batch,width=64)")
    assert ModelSpec("convnet", {"width": 64, "depth": 4}) == parse_model_spec(
        "convnet(depth=4,width=64)"
    )
    assert hash(spec) == hash(parse_model_spec(str(spec)))


@pytest.mark.parametrize(
    "text", ["convnet(depth=4", "convnet(depth)", "convnet(=3)", "conv net", "a,b", "x)("]
)
def test_malformed_spec_raises(text: str) -> None:
    with pytest.raises(ConfigError, match="expected|key=value"):
        parse_model_spec(text)


def test_spec_refuses_values_that_would_not_round_trip() -> None:
    with pytest.raises(ConfigError, match="norm"):
        ModelSpec("convnet", {"norm": "a,b"})
    with pytest.raises(ConfigError, match="round-trip"):
        ModelSpec("convnet", {"norm": "3"})


def test_unknown_model_lists_every_valid_name(device) -> None:
    with pytest.raises(UnknownNameError) as info:
        _build("convnet9", SHAPES["cifar"], device)
    message = str(info.value)
    assert "convnet9" in message
    for name in list_models():
        assert name in message


def test_bad_norm_names_received_and_allowed_values(device) -> None:
    with pytest.raises(ConfigError) as info:
        _build("convnet(norm=foo)", SHAPES["cifar"], device)
    message = str(info.value)
    assert "norm='foo'" in message
    assert all(norm in message for norm in NORMS)


def test_every_bad_value_is_reported_at_once(device) -> None:
    with pytest.raises(ConfigError) as info:
        _build("convnet(depth=0,act=tanh,pool=sum)", SHAPES["cifar"], device)
    assert len(info.value.problems) == 3


def test_unknown_and_reserved_options_are_refused(device) -> None:
    with pytest.raises(ConfigError, match=r"unknown option size=3.*allowed options: act, depth"):
        _build("mlp(depth=2,size=3)", SHAPES["cifar"], device)
    with pytest.raises(ConfigError, match="set by build_model"):
        _build("convnet(num_classes=3)", SHAPES["cifar"], device)


def test_bad_sizes_are_reported_together(device) -> None:
    with pytest.raises(ConfigError) as info:
        build_model("convnet", in_channels=0, num_classes=-1, image_size=(32,), device=device)
    assert len(info.value.problems) == 3


def test_split_model_list() -> None:
    assert split_model_list("convnet(depth=4,width=64), mlp,tv:resnet18") == [
        "convnet(depth=4,width=64)", "mlp", "tv:resnet18"
    ]
    assert split_model_list("convnet") == ["convnet"]
    for bad in ("convnet(depth=4,mlp", "convnet,,mlp", "a)b("):
        with pytest.raises(ConfigError):
            split_model_list(bad)


def test_register_model_checks_options(monkeypatch, device) -> None:
    monkeypatch.setattr(model_registry, "_MODELS", Registry("model"))

    @register_model("tiny")
    def tiny(*, in_channels, num_classes, image_size, hidden=8):
        model = MLP(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                    width=4, depth=1)
        model.hidden = hidden
        return model

    model = build_model(
        "tiny(hidden=3)", in_channels=1, num_classes=2, image_size=(8, 8), device=device
    )
    assert model.hidden == 3 and model.feature_dim == 4
    assert list_models() == ["tiny", "tv:<torchvision name>"]
    with pytest.raises(ConfigError, match="allowed options: hidden"):
        build_model("tiny(width=3)", in_channels=1, num_classes=2, image_size=(8, 8),
                    device=device)
    with pytest.raises(DuplicateNameError):
        register_model("tiny")(tiny)
    with pytest.raises(ConfigError, match="reserved"):
        register_model("tv:tiny")


# --- torchvision ----------------------------------------------------------------------------


def test_tv_resnet18_on_single_channel_mnist(device) -> None:
    model = _build("tv:resnet18", SHAPES["mnist"], device)
    x = torch.randn(2, 1, 28, 28)

    feats = model.embed(x)  # (B, 512)
    logits = model(x)  # (B, classes)

    assert model.feature_dim == 512 and feats.shape == (2, 512)
    assert logits.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(model.classifier(feats), logits)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_tv_unknown_name_lists_torchvision_names(device) -> None:
    with pytest.raises(UnknownNameError, match=r"tv:nonet.*tv:resnet18"):
        _build("tv:nonet", SHAPES["cifar"], device)


def test_tv_without_linear_classifier_is_unsupported(device) -> None:
    with pytest.raises(UnsupportedFeatureError, match="squeezenet1_1"):
        _build("tv:squeezenet1_1", SHAPES["cifar"], device)


def test_tv_refuses_weights(device) -> None:
    with pytest.raises(ConfigError, match="weights=None"):
        _build("tv:resnet18(weights=default)", SHAPES["cifar"], device)


# --- torch.func: K networks at once ---------------------------------------------------------


def _stacked(name: str, shape: tuple[int, int, int], device, copies: int = 3):
    models = [_build(name, shape, device) for _ in range(copies)]
    params, buffers = stack_module_state(models)  # each (K, ...)
    base = copy.deepcopy(models[0]).to("meta")
    return models, params, buffers, base


@pytest.mark.parametrize("name", NATIVE_MODELS)
def test_vmap_over_stacked_models_matches_each_model(name: str, device) -> None:
    shape = SHAPES["digits"]
    models, params, buffers, base = _stacked(name, shape, device, copies=2)
    x = torch.randn(BATCH, *shape, device=device)

    def run(p, b, images):
        return functional_call(base, (p, b), (images,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)  # (K, B, classes)
    expected = torch.stack([m(x) for m in models])  # (K, B, classes)

    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # batch-norm models update their stacked running statistics like the separate copies do
    for key, stacked in buffers.items():
        separate = torch.stack([dict(m.named_buffers())[key] for m in models])
        torch.testing.assert_close(stacked, separate, rtol=1e-4, atol=1e-6)


def test_vmap_three_convnets_on_cifar(device) -> None:
    models, params, buffers, base = _stacked("convnet(width=32)", SHAPES["cifar"], device)
    x = torch.randn(BATCH, *SHAPES["cifar"], device=device)

    out = vmap(lambda p, xs: functional_call(base, p, (xs,)), in_dims=(0, None))(params, x)
    expected = torch.stack([m(x) for m in models])  # (3, B, classes)

    assert not buffers  # instance norm keeps no running statistics
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[0], out[1])  # the copies really differ


def test_vmap_three_convnet_bn_in_train_mode_with_stacked_buffers(device) -> None:
    models, params, buffers, base = _stacked("convnet-bn(width=32)", SHAPES["cifar"], device)
    x = torch.randn(3, BATCH, *SHAPES["cifar"], device=device)  # a batch per model
    means_before = buffers["features.1.running_mean"].clone()  # (3, 32)

    out = vmap(lambda p, b, xs: functional_call(base, (p, b), (xs,)))(params, buffers, x)
    expected = torch.stack([m(xs) for m, xs in zip(models, x)])  # (3, B, classes)

    assert base.training and "features.1.running_mean" in buffers
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the stacked running statistics were updated in place, as each copy updated its own
    assert not torch.equal(buffers["features.1.running_mean"], means_before)
    for key, stacked in buffers.items():
        separate = torch.stack([dict(m.named_buffers())[key] for m in models])
        torch.testing.assert_close(stacked, separate, rtol=1e-4, atol=1e-6)
    assert torch.equal(buffers["features.1.num_batches_tracked"], torch.ones(3, dtype=torch.long))


def test_vmap_of_grad_trains_stacked_convnets(device) -> None:
    models, params, buffers, base = _stacked("convnet(width=16)", SHAPES["digits"], device)
    x = torch.randn(BATCH, *SHAPES["digits"], device=device)
    labels = torch.arange(BATCH, device=device)

    def loss(p, b, images, targets):
        return F.cross_entropy(functional_call(base, (p, b), (images,)), targets)

    grads = vmap(grad(loss), in_dims=(0, 0, None, None))(params, buffers, x, labels)

    for k, model in enumerate(models):
        F.cross_entropy(model(x), labels).backward()
        for key, param in model.named_parameters():
            torch.testing.assert_close(grads[key][k], param.grad, rtol=1e-4, atol=1e-6)
