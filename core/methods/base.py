"""The distiller interface and the method registry."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..data import DatasetSplits
from ..errors import NonFiniteError
from ..evaluation import EvaluationProtocol
from ..models import build_model
from ..registry import Registry
from ..selection import select
from ..synthetic import SyntheticSet
from .config import MethodConfig

__all__ = ["METHODS", "Distiller", "get_method", "list_methods", "register_method"]

logger = logging.getLogger(__name__)

METHODS: Registry[type["Distiller"]] = Registry("method")


def register_method(cls: type["Distiller"]) -> type["Distiller"]:
    """Class decorator: register a distiller under its `name`."""
    METHODS.register(cls.name, cls)
    return cls


# Packages add methods through this entry-point group: each entry names a module whose import
# registers distillers (ddsuite's own privacy application registers dp-dm and dp-dc this way).
ENTRY_POINT_GROUP = "ddsuite.methods"
_plugins_loaded = False


def _load_plugins() -> None:
    """Import every module of the ``ddsuite.methods`` entry-point group, once.

    A module that fails to import is logged and skipped, so one broken package cannot hide
    the other methods; its methods are then simply not registered.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a third-party module may fail in any way
            logger.warning("methods of entry point %r (%s) are unavailable: %s", entry.name,
                           entry.value, exc)


def get_method(name: str) -> type["Distiller"]:
    if name not in METHODS:
        _load_plugins()
    return METHODS.get(name)


def list_methods() -> list[str]:
    _load_plugins()
    return METHODS.names()


class Distiller(ABC):
    """One dataset-distillation method.

    The engine owns the loop, seeding, checkpoints and callbacks; a distiller owns its
    objective. For every outer iteration the engine calls `step` with a generator seeded for
    that iteration (and the global RNG seeded the same way, for module initialisation), so a
    resumed run repeats exactly what an uninterrupted one would have done.

    Subclasses set `name`, `family`, `summary` and `Config`, and implement `step`. One-shot
    methods (coresets) set `iterative = False` and do their work in `initialize`.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    iterative: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, *, splits: DatasetSplits,
                 device: torch.device | str):
        self.config = config
        self.splits = splits
        self.train = splits.train
        self.device = torch.device(device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.train.check_ipc(config.ipc)

    # -- what the engine calls -------------------------------------------------------------

    @property
    def iterations(self) -> int:
        return int(self.config.iterations or 0) if self.iterative else 0

    def initialize(self, generator: torch.Generator) -> SyntheticSet:
        """The starting synthetic set (for coresets, the final one)."""
        return SyntheticSet(self.initial_images(self.config.init, generator),
                            num_classes=self.train.num_classes, ipc=self.config.ipc)

    def setup(self, syn: SyntheticSet) -> None:
        """Create the optimiser of the learnable tensors (called once, before any step)."""
        self.optimizer = torch.optim.SGD([syn.images_syn], lr=self.config.lr_images,
                                         momentum=self.config.momentum)

    @abstractmethod
    def step(self, syn: SyntheticSet, *, iteration: int,
             generator: torch.Generator) -> dict[str, float]:
        """One outer iteration; updates `syn` in place and returns scalar metrics."""

    @classmethod
    def eval_protocol(cls, config: MethodConfig) -> EvaluationProtocol:
        """The evaluation protocol the published method was reported under."""
        return EvaluationProtocol(models=(config.model,))

    def artifact_meta(self) -> dict[str, Any]:
        """Metadata the finished set's artifact must carry beyond the engine's own (a private
        distiller's spent budget); read once the run has ended."""
        return {}

    def final_protocol(self, syn: SyntheticSet,
                       protocol: EvaluationProtocol) -> EvaluationProtocol:
        """The protocol the finished `syn` is evaluated under: `protocol` itself, unless the
        method learns part of its own protocol (MTT's step size becomes the learning rate)."""
        return protocol

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    # -- helpers for subclasses ------------------------------------------------------------

    def initial_images(self, init: str, generator: torch.Generator) -> Tensor:
        """Images (classes * ipc, C, H, W), class-major, for the given init rule."""
        ipc, train = self.config.ipc, self.train
        if init == "real":
            per_class = train.sample_per_class(ipc, generator=generator)  # (C, ipc, ...)
            return per_class.flatten(0, 1).to(self.device)
        if init == "noise":
            shape = (train.num_classes * ipc, *train.image_shape)
            noise = torch.randn(shape, generator=generator, device=generator.device)
            return noise.to(self.device)
        features = train.images.flatten(1)  # coreset rules on raw pixels
        index = select(init, features, train.class_index, ipc, generator=generator)
        return train.images[index].to(self.device)

    def fresh_model(self, spec: str | None = None) -> nn.Module:
        """A newly initialised network (from the global RNG, seeded by the engine)."""
        c, h, w = self.train.image_shape
        return build_model(spec or self.config.model, in_channels=c,
                           num_classes=self.train.num_classes, image_size=(h, w),
                           device=self.device)

    def batch_real(self) -> int:
        """Real images per class per iteration: the config's, capped at the smallest class."""
        smallest = min(self.train.class_counts)
        if self.config.batch_real > smallest:
            logger.debug("batch_real %d capped at the smallest class size %d",
                         self.config.batch_real, smallest)
        return min(self.config.batch_real, smallest)

    def siamese_batches(self, syn: SyntheticSet, batch_real: int, generator: torch.Generator,
                        augment: Any | None) -> tuple[Tensor, Tensor]:
        """`batch_real` real images per class, (classes * batch_real, C, H, W), and the
        synthetic images, both seen through one shared draw of `augment` per class (None:
        unaugmented)."""
        classes, ipc = syn.num_classes, syn.ipc
        real = self.train.sample_per_class(batch_real, generator=generator).to(self.device)
        real = real.flatten(0, 1)
        images_syn = syn.images_syn  # (classes * ipc, C, H, W)
        if augment is not None:
            draw = augment.draw(classes, generator=generator, device=self.device)
            groups = torch.arange(classes, device=self.device)
            real = augment.apply(real, draw, groups.repeat_interleave(batch_real))
            images_syn = augment.apply(images_syn, draw, groups.repeat_interleave(ipc))
        return real, images_syn

    @staticmethod
    def check_finite(loss: Tensor, *, iteration: int, what: str = "loss") -> None:
        if not torch.isfinite(loss).all():
            raise NonFiniteError(what, iteration, detail=f"value {loss.detach().cpu().tolist()}")

    def update_images(self, loss: Tensor, *, iteration: int) -> None:
        """Backpropagate `loss` into the synthetic set and take one optimiser step.

        Checks the loss before the update and the gradients before the step, so a
        non-finite value never reaches the images.
        """
        self.check_finite(loss, iteration=iteration)
        assert self.optimizer is not None, "setup() must run before step()"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.step_if_finite(iteration=iteration)

    def step_if_finite(self, *, iteration: int) -> None:
        """Take the optimiser step unless a gradient is non-finite (a param group's `name`, if
        it has one, says which learnable tensor it was)."""
        assert self.optimizer is not None, "setup() must run before step()"
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    what = group.get("name", "synthetic set")
                    raise NonFiniteError(f"gradient of the {what}", iteration)
        self.optimizer.step()
