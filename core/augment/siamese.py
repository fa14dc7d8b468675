"""The siamese augmenter: draw the randomness once, apply it to real and synthetic batches.

Typical use in a matching loss, where each class shares one transformation::

    aug = DiffAugment(strategy_for_dataset("cifar10"))
    draw = aug.draw(num_classes, generator=gen, device=device)
    images_real = aug.apply(images_real, draw, groups=labels_real)  # (N_real, C, H, W)
    images_syn = aug.apply(images_syn, draw, groups=labels_syn)  # (N_syn, C, H, W)

Every random number comes from the explicit generator, so the global RNG is never touched
and a run is reproducible from its seed alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .ops import AUGMENT_OPS
from .params import DEFAULT_STRATEGY, AugmentParams

__all__ = ["AUGMENT_MODES", "AugmentDraw", "DiffAugment", "OpDraw"]

AUGMENT_MODES = ("single", "multiple")
"""`single`: one op of the strategy per call (the published default); `multiple`: all ops."""

_IDENTITY = "none"


@dataclass(frozen=True, eq=False)
class OpDraw:
    """The random parameters of one op for every draw.

    Attributes:
        name: the op's registered name.
        values: the op's parameters, each a tensor of shape (num_draws, ...).
    """

    name: str
    values: Mapping[str, Tensor]


@dataclass(frozen=True, eq=False)
class AugmentDraw:
    """The randomness of one augmentation call, shareable between batches.

    Attributes:
        steps: the ops to apply, in order, with their drawn parameters (empty for ``none``;
            one step in ``single`` mode).
        num_draws: how many independent transformations were drawn; ``apply`` maps each
            image to one of them through its group.
        params: the op strengths the draw was made with.
    """

    steps: tuple[OpDraw, ...]
    num_draws: int
    params: AugmentParams = field(default_factory=AugmentParams)

    @property
    def ops(self) -> tuple[str, ...]:
        """The names of the ops this draw applies, in order."""
        return tuple(step.name for step in self.steps)

    def to(self, device: torch.device | str) -> AugmentDraw:
        """Return a copy whose parameter tensors live on `device`."""
        steps = tuple(
            OpDraw(step.name, {key: value.to(device) for key, value in step.values.items()})
            for step in self.steps
        )
        return AugmentDraw(steps, self.num_draws, self.params)


def _parse_strategy(strategy: object, problems: list[str]) -> tuple[str, ...]:
    """Split a strategy string into op names, appending every problem found."""
    allowed = f"allowed ops: {', '.join(AUGMENT_OPS.names())}, or 'none' for no augmentation"
    if not isinstance(strategy, str):
        problems.append(f"strategy must be a str such as {DEFAULT_STRATEGY!r}, got {strategy!r}")
        return ()
    text = strategy.strip().lower()
    if text == _IDENTITY:
        return ()
    if not text:
        problems.append(f"strategy is empty; use 'none' for no augmentation ({allowed})")
        return ()

    ops: list[str] = []
    for part in text.split("_"):
        if not part:
            problems.append(f"strategy {strategy!r} has an empty op (a doubled or edge '_')")
        elif part == _IDENTITY:
            problems.append(f"strategy {strategy!r}: 'none' cannot be combined with other ops")
        elif part not in AUGMENT_OPS:
            problems.append(f"strategy {strategy!r}: unknown op {part!r}; {allowed}")
        elif part in ops:
            problems.append(f"strategy {strategy!r}: op {part!r} is listed more than once")
        else:
            ops.append(part)
    return tuple(ops)


class DiffAugment:
    """Differentiable siamese augmentation (DSA, Zhao & Bilen 2021).

    The same random transformation can be applied to several batches (real and synthetic)
    so that a matching loss compares like with like; every op is differentiable with respect
    to the images, so the gradient of that loss reaches the synthetic pixels.

    Args:
        strategy: ops joined by ``_`` (see `AUGMENT_OPS`), or ``"none"`` for the identity.
        params: the op strengths; the defaults are the published ones.
        mode: ``"single"`` picks one op of the strategy at random per draw call (the
            published DSA behaviour); ``"multiple"`` applies every op in order.

    Raises:
        ConfigError: listing every unknown op, bad mode or malformed strategy at once.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> aug = DiffAugment("crop_flip", mode="multiple")
        >>> out_real, out_syn = aug.siamese(torch.rand(8, 3, 32, 32), torch.rand(2, 3, 32, 32),
        ...                                 generator=gen)
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        *,
        params: AugmentParams = AugmentParams(),
        mode: str = "single",
    ):
        problems: list[str] = []
        ops = _parse_strategy(strategy, problems)
        if mode not in AUGMENT_MODES:
            problems.append(f"mode {mode!r} is not allowed; allowed modes: single, multiple")
        if not isinstance(params, AugmentParams):
            problems.append(f"params must be an AugmentParams, got {type(params).__name__}")
        if problems:
            raise ConfigError(problems, source="DiffAugment")

        self.ops: tuple[str, ...] = ops
        self.strategy: str = "_".join(ops) if ops else _IDENTITY
        self.params: AugmentParams = params
        self.mode: str = mode

    @property
    def is_identity(self) -> bool:
        """True when the strategy is ``none`` and images pass through unchanged."""
        return not self.ops

    def __repr__(self) -> str:
        return f"DiffAugment({self.strategy!r}, mode={self.mode!r}, params={self.params!r})"

    def to_dict(self) -> dict[str, Any]:
        """Return the resolved configuration, for provenance metadata."""
        return {"strategy": self.strategy, "mode": self.mode, "params": self.params.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffAugment:
        """Rebuild an augmenter from `to_dict()` output."""
        params = AugmentParams.from_dict(dict(data.get("params", {})))
        strategy = data.get("strategy", DEFAULT_STRATEGY)
        return cls(strategy, params=params, mode=data.get("mode", "single"))

    # ------------------------------------------------------------------------ randomness

    def draw(
        self, num_draws: int, *, generator: torch.Generator, device: torch.device | str
    ) -> AugmentDraw:
        """Draw `num_draws` independent transformations from `generator` alone.

        Random numbers are produced on the generator's own device, then moved to `device`,
        so a CPU generator serves CUDA images. In ``single`` mode the one op is chosen here,
        once for the whole call.

        Args:
            num_draws: how many transformations (e.g. one per class, or one per image).
            generator: the only source of randomness; the global RNG is left untouched.
            device: where the drawn parameters should live (the images' device).

        Returns:
            The draw, to pass to `apply` for every batch that should share it.
        """
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"num_draws must be a positive int, got {num_draws!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = torch.device(device)

        names = self.ops
        if self.mode == "single" and len(names) > 1:
            pick = torch.randint(len(names), (1,), generator=generator, device=generator.device)
            names = (names[int(pick.item())],)

        steps = []
        for name in names:
            values = AUGMENT_OPS.get(name).sample(num_draws, generator, self.params)
            steps.append(OpDraw(name, {key: v.to(device) for key, v in values.items()}))
        return AugmentDraw(tuple(steps), num_draws, self.params)

    # ------------------------------------------------------------------------- transform

    def apply(self, images: Tensor, draw: AugmentDraw, groups: Tensor | None = None) -> Tensor:
        """Transform `images` with `draw`; image i uses draw number ``groups[i]``.

        Args:
            images: a float batch of shape (B, C, H, W).
            draw: from `draw`; the same draw applied to two batches gives the same
                transformation to images of the same group.
            groups: integer tensor of shape (B,) with values in ``[0, draw.num_draws)``,
                e.g. class labels when one draw per class was made. None means image i uses
                draw i and requires ``B == draw.num_draws``.

        Returns:
            The augmented batch, (B, C, H, W), differentiable with respect to `images`.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        batch = images.shape[0]
        index = None if groups is None else self._check_groups(groups, batch, draw, images)
        if groups is None and batch != draw.num_draws:
            raise ValueError(
                f"a batch of {batch} images needs groups when the draw holds {draw.num_draws} "
                "transformations; pass groups (e.g. the labels) or draw once per image"
            )

        out = images  # (B, C, H, W)
        for step in draw.steps:
            values = {}
            for key, value in step.values.items():
                value = value.to(images.device)  # (num_draws, ...)
                values[key] = value if index is None else value.index_select(0, index)  # (B,)
            out = AUGMENT_OPS.get(step.name).transform(out, values, draw.params)
        return out

    @staticmethod
    def _check_groups(groups: Tensor, batch: int, draw: AugmentDraw, images: Tensor) -> Tensor:
        if not isinstance(groups, Tensor) or groups.dim() != 1 or groups.shape[0] != batch:
            shape = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
            raise ValueError(f"groups must be a ({batch},) integer tensor, got {shape}")
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise TypeError(f"groups must be an integer tensor, got {groups.dtype}")
        index = groups.to(device=images.device, dtype=torch.long)  # (B,)
        if batch and (int(index.min()) < 0 or int(index.max()) >= draw.num_draws):
            raise ValueError(
                f"groups must lie in [0, {draw.num_draws}) for this draw, got values in "
                f"[{int(index.min())}, {int(index.max())}]"
            )
        return index

    # ----------------------------------------------------------------------- conveniences

    def __call__(self, images: Tensor, *, generator: torch.Generator) -> Tensor:
        """Augment each image with its own independent draw (e.g. when training on S).

        Args:
            images: a float batch of shape (B, C, H, W).
            generator: the only source of randomness.

        Returns:
            The augmented batch, (B, C, H, W).
        """
        if self.is_identity or images.shape[0] == 0:
            return images
        draw = self.draw(images.shape[0], generator=generator, device=images.device)
        return self.apply(images, draw)

    def siamese(
        self, images_a: Tensor, images_b: Tensor, *, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Apply one shared draw to every image of both batches.

        For one class at a time (the DSA matching loop) this gives the real and synthetic
        images of that class the identical transformation. For many classes in one batch,
        use `draw` with one draw per class and `apply` with the labels as groups.

        Args:
            images_a: a float batch (B_a, C, H, W), e.g. real images of one class.
            images_b: a float batch (B_b, C, H, W), e.g. synthetic images of that class.
            generator: the only source of randomness.

        Returns:
            The two augmented batches, shapes unchanged.
        """
        if self.is_identity:
            return images_a, images_b
        draw = self.draw(1, generator=generator, device=images_a.device)
        groups_a = torch.zeros(images_a.shape[0], dtype=torch.long, device=images_a.device)
        groups_b = torch.zeros(images_b.shape[0], dtype=torch.long, device=images_b.device)
        return self.apply(images_a, draw, groups_a), self.apply(images_b, draw, groups_b)
