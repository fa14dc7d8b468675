"""Tests of differentiable siamese augmentation (ddsuite.core.augment), CPU only."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ddsuite.core.augment import (
    AUGMENT_OPS,
    DEFAULT_STRATEGY,
    AugmentDraw,
    AugmentParams,
    DiffAugment,
    OpDraw,
    default_strategy,
    strategy_for_dataset,
)
from ddsuite.core.errors import ConfigError

OPS = AUGMENT_OPS.names()
CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    # Strictly positive and non-constant, so every op (cutout included) visibly changes it.
    return torch.rand(*shape, generator=_gen(seed)) + 0.1


def _manual_draw(name: str, **values: list[float] | list[bool]) -> AugmentDraw:
    tensors = {key: torch.tensor(value) for key, value in values.items()}
    num_draws = len(next(iter(values.values())))
    return AugmentDraw((OpDraw(name, tensors),), num_draws, AugmentParams())


# ------------------------------------------------------------------------ siamese sharing


@pytest.mark.parametrize("mode", ["single", "multiple"])
def test_same_draw_on_identical_batches_gives_identical_outputs(mode: str) -> None:
    aug = DiffAugment(mode=mode)
    images = _images(6, 3, 16, 16)  # (B, C, H, W)
    draw = aug.draw(6, generator=_gen(1), device=CPU)

    out_a = aug.apply(images, draw)
    out_b = aug.apply(images.clone(), draw)

    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, images)


def test_groups_share_a_transform_within_a_group_only() -> None:
    aug = DiffAugment(mode="multiple")
    images = _images(1, 3, 16, 16).expand(4, -1, -1, -1)  # four copies of one image
    draw = aug.draw(2, generator=_gen(2), device=CPU)

    out = aug.apply(images, draw, groups=torch.tensor([0, 0, 1, 1]))

    assert torch.equal(out[0], out[1])
    assert torch.equal(out[2], out[3])
    assert not torch.allclose(out[0], out[2])


def test_real_and_synthetic_batches_get_the_same_transform_per_class() -> None:
    aug = DiffAugment(mode="multiple")
    images_real = _images(12, 3, 16, 16)  # (N_real, C, H, W)
    labels_real = torch.arange(12) % 3
    pick = torch.tensor([4, 0, 11])  # one real image of each class: 1, 0, 2
    images_syn, labels_syn = images_real[pick].clone(), labels_real[pick]  # (3, C, H, W)

    draw = aug.draw(3, generator=_gen(3), device=CPU)
    out_real = aug.apply(images_real, draw, groups=labels_real)
    out_syn = aug.apply(images_syn, draw, groups=labels_syn)

    torch.testing.assert_close(out_syn, out_real[pick], rtol=0, atol=1e-6)


def test_siamese_shares_one_draw_while_call_draws_per_image() -> None:
    aug = DiffAugment(mode="multiple")
    images = _images(1, 3, 16, 16).expand(3, -1, -1, -1)  # (3, C, H, W), identical

    out_a, out_b = aug.siamese(images, images[:2], generator=_gen(4))
    independent = aug(images, generator=_gen(4))

    assert torch.equal(out_a[0], out_a[2])
    torch.testing.assert_close(out_b, out_a[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(independent[0], independent[1])


# -------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("op", OPS)
def test_gradients_reach_the_input_and_are_finite(op: str) -> None:
    aug = DiffAugment(op)
    images = _images(4, 3, 12, 12).requires_grad_(True)
    weights = torch.randn(4, 3, 12, 12, generator=_gen(5))

    (aug(images, generator=_gen(6)) * weights).sum().backward()

    assert images.grad is not None
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.parametrize("op", OPS)
def test_gradients_match_finite_differences(op: str) -> None:
    aug = DiffAugment(op)
    draw = aug.draw(2, generator=_gen(7), device=CPU)
    images = _images(2, 3, 6, 6).double().requires_grad_(True)

    assert torch.autograd.gradcheck(lambda x: aug.apply(x, draw), (images,))


# ----------------------------------------------------------------------- randomness


def test_same_seed_same_output_and_different_seed_different_output() -> None:
    aug = DiffAugment()
    images = _images(8, 3, 16, 16)

    first = aug(images, generator=_gen(10))
    again = aug(images, generator=_gen(10))
    other = aug(images, generator=_gen(11))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_global_rng_is_untouched() -> None:
    aug = DiffAugment(mode="multiple")
    images = _images(4, 3, 16, 16)
    state = torch.get_rng_state()

    draw = aug.draw(2, generator=_gen(12), device=CPU)
    aug.apply(images, draw, groups=torch.tensor([0, 1, 0, 1]))
    aug(images, generator=_gen(13))
    aug.siamese(images, images[:1], generator=_gen(14))
    DiffAugment()(images, generator=_gen(15))

    assert torch.equal(state, torch.get_rng_state())


def test_single_mode_picks_one_op_per_call_and_varies_it() -> None:
    single = DiffAugment(mode="single")
    multiple = DiffAugment(mode="multiple")

    picked = {single.draw(5, generator=_gen(seed), device=CPU).ops for seed in range(40)}

    assert all(len(ops) == 1 for ops in picked)
    assert len(picked) >= 4
    every_op = multiple.draw(5, generator=_gen(0), device=CPU).ops
    assert every_op == tuple(DEFAULT_STRATEGY.split("_"))


def test_draw_values_have_one_row_per_draw() -> None:
    draw = DiffAugment(mode="multiple").draw(7, generator=_gen(16), device=CPU)

    for step in draw.steps:
        for value in step.values.values():
            assert value.shape[0] == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_serves_cuda_images() -> None:
    aug = DiffAugment(mode="multiple")
    images = _images(4, 3, 16, 16)

    on_gpu = aug(images.cuda(), generator=_gen(17))
    on_cpu = aug(images, generator=_gen(17))

    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- op semantics


@pytest.mark.parametrize("op", OPS)
def test_each_op_alone_changes_a_non_constant_image(op: str) -> None:
    images = _images(8, 3, 16, 16)

    out = DiffAugment(op)(images, generator=_gen(20))

    assert out.shape == images.shape
    assert not torch.allclose(out, images)


def test_crop_translates_with_zero_padding() -> None:
    images = _images(1, 1, 8, 8)  # crop_ratio 0.125 of 8 -> shifts of at most 1 pixel
    draw = _manual_draw("crop", shift_y_unit=[0.0], shift_x_unit=[0.5])  # dy = -1, dx = 0

    out = DiffAugment("crop").apply(images, draw)

    assert torch.equal(out[0, 0, 0], torch.zeros(8))
    assert torch.equal(out[0, 0, 1:], images[0, 0, :-1])


def test_cutout_zeroes_a_square_of_half_the_side() -> None:
    images = _images(1, 1, 8, 8)
    draw = _manual_draw("cutout", centre_y_unit=[0.5], centre_x_unit=[0.5])  # centre (4, 4)

    out = DiffAugment("cutout").apply(images, draw)

    assert torch.equal(out[0, 0, 2:6, 2:6], torch.zeros(4, 4))
    assert int((out == 0).sum()) == 16
    assert torch.equal(out[0, 0, :2], images[0, 0, :2])


def test_flip_mirrors_only_the_drawn_images() -> None:
    images = _images(2, 3, 5, 5)
    draw = _manual_draw("flip", flip=[True, False])

    out = DiffAugment("flip").apply(images, draw)

    assert torch.equal(out[0], images[0].flip(-1))
    assert torch.equal(out[1], images[1])


def test_color_shifts_brightness_by_the_drawn_amount() -> None:
    images = _images(1, 3, 4, 4)
    draw = _manual_draw(
        "color", brightness_shift=[0.25], saturation_factor=[1.0], contrast_factor=[1.0]
    )

    out = DiffAugment("color").apply(images, draw)

    torch.testing.assert_close(out, images + 0.25)


@pytest.mark.parametrize(
    ("op", "values"),
    [("scale", {"scale_x": [1.0], "scale_y": [1.0]}), ("rotate", {"angle": [0.0]})],
)
def test_neutral_warps_are_the_identity(op: str, values: dict[str, list[float]]) -> None:
    images = _images(1, 3, 9, 7)

    out = DiffAugment(op).apply(images, _manual_draw(op, **values))

    torch.testing.assert_close(out, images, rtol=0, atol=1e-5)


def test_rotation_by_a_right_angle_turns_a_square_image() -> None:
    images = _images(1, 1, 6, 6)
    params = AugmentParams(ratio_rotate=90.0)
    draw = AugmentDraw((OpDraw("rotate", {"angle": torch.tensor([math.pi / 2])}),), 1, params)

    out = DiffAugment("rotate", params=params).apply(images, draw)

    turned = [torch.rot90(images, k, dims=(2, 3)) for k in (1, 3)]
    assert any(torch.allclose(out, t, atol=1e-5) for t in turned)


def test_none_is_the_identity() -> None:
    aug = DiffAugment("none")
    images = _images(3, 3, 8, 8)

    draw = aug.draw(3, generator=_gen(21), device=CPU)

    assert aug.is_identity and aug.ops == () and aug.strategy == "none"
    assert draw.steps == ()
    assert torch.equal(aug.apply(images, draw), images)
    assert torch.equal(aug(images, generator=_gen(21)), images)
    out_a, out_b = aug.siamese(images, images[:1], generator=_gen(0))
    assert torch.equal(out_a, images) and torch.equal(out_b, images[:1])


# ------------------------------------------------------------------- configuration


def test_strategy_for_dataset_drops_flip_for_digits_only() -> None:
    assert "flip" not in strategy_for_dataset("mnist").split("_")
    assert "flip" in strategy_for_dataset("cifar10").split("_")
    for name in ("digits", "SVHN", "fashion-mnist", "Fashion_MNIST", "FashionMNIST"):
        assert strategy_for_dataset(name) == default_strategy(flip=False), name
    assert default_strategy(flip=True) == DEFAULT_STRATEGY
    assert default_strategy(flip=False) == "color_crop_cutout_scale_rotate"


def test_invalid_strategy_names_the_bad_op_and_lists_allowed_ops() -> None:
    with pytest.raises(ConfigError) as info:
        DiffAugment("color_zoom_crop")

    message = str(info.value)
    assert "'zoom'" in message
    for op in OPS:
        assert op in message
    assert "none" in message


def test_invalid_mode_lists_allowed_modes_with_strategy_problems_together() -> None:
    with pytest.raises(ConfigError) as info:
        DiffAugment("crop_bogus", mode="all")

    assert len(info.value.problems) == 2
    assert "'all'" in str(info.value) and "single" in str(info.value)
    assert "multiple" in str(info.value)


@pytest.mark.parametrize("strategy", ["", "crop__flip", "none_crop", "crop_crop", "_crop"])
def test_malformed_strategies_are_refused(strategy: str) -> None:
    with pytest.raises(ConfigError):
        DiffAugment(strategy)


def test_params_out_of_range_are_all_reported() -> None:
    with pytest.raises(ConfigError) as info:
        AugmentParams(scale=0.5, flip_prob=2.0, brightness=-1.0)

    assert len(info.value.problems) == 3


def test_groups_are_validated() -> None:
    aug = DiffAugment("crop")
    images = _images(4, 3, 8, 8)
    draw = aug.draw(2, generator=_gen(22), device=CPU)

    with pytest.raises(ValueError, match="groups"):
        aug.apply(images, draw)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        aug.apply(images, draw, groups=torch.tensor([0, 1, 2, 0]))


def test_to_dict_round_trips() -> None:
    aug = DiffAugment("Crop_Flip", params=AugmentParams(crop_ratio=0.25), mode="multiple")

    rebuilt = DiffAugment.from_dict(aug.to_dict())

    assert aug.strategy == "crop_flip" and aug.ops == ("crop", "flip")
    assert rebuilt.to_dict() == aug.to_dict()
    assert rebuilt.params.crop_ratio == 0.25


# ------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 3),
    height=st.integers(2, 20),
    width=st.integers(2, 20),
    ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=len(OPS), unique=True),
    mode=st.sampled_from(["single", "multiple"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_outputs_are_finite_and_shape_preserving(
    batch: int, channels: int, height: int, width: int, ops: list[str], mode: str, seed: int
) -> None:
    aug = DiffAugment("_".join(ops), mode=mode)
    images = torch.randn(batch, channels, height, width, generator=_gen(seed))

    out = aug(images, generator=_gen(seed + 1))

    assert out.shape == images.shape
    assert out.dtype == images.dtype
    assert torch.isfinite(out).all()
