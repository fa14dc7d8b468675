"""A replay memory condensed by any registered ddsuite method, as an Avalanche storage policy.

`CondensedBuffer` subclasses Avalanche's `ExemplarsBuffer`. After each experience it condenses
that experience's data, class by class, into its share of the memory with a ddsuite
distiller (`dm`, `dc`, ... or a coreset rule such as `random`, `herding`, `k-center`) and
exposes the whole memory as an Avalanche dataset with `targets` and task labels, so Avalanche's
replay loaders accept it.

Memory policy (documented, logged):

- The memory is divided into *groups*, one per (experience, class) pair. In a class-incremental
  stream every class arrives once, so a group is a class; in a domain-incremental stream
  (permuted pixels) each experience brings its own group for every class.
- `total_num_groups` given: every group gets ``max_size // total_num_groups`` images for the
  whole stream (the field's protocol: a fixed number of images per class).
  `total_num_groups` None: the memory is shared equally among the groups seen so far; when new
  groups arrive, older groups are *sub-sampled* (a seeded random subset of their stored
  images is kept; the data they came from is gone, so they cannot be condensed again).
- Slots left over by the integer division stay empty, so every group holds the same number
  of images; `memory_bytes` reports what is actually stored.
- Labels are kept exactly as the benchmark gives them; the distiller sees them remapped to
  0..k-1 for the experience and the images come back with their original labels.

Errors instead of silent empty buffers: a memory too small for one image per group, a class
with fewer images than its share, task labels other than 0 when the buffer is task-free, or a
method name that no registry knows.
"""

from __future__ import annotations

import logging
import time
from numbers import Integral
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.training.storage_policy import ExemplarsBuffer

from ddsuite.core.data import DatasetSplits, InputSpace, RealDataset
from ddsuite.core.data.identity import DatasetIdentity, fingerprint_tensors
from ddsuite.core.device import device_problems, resolve_device
from ddsuite.core.engine import distill
from ddsuite.core.errors import ConfigError, IPCError, UnsupportedFeatureError
from ddsuite.core.methods import config_from_dict, get_method

from .benchmark import tensor_dataset

__all__ = ["CondensedBuffer", "CondensationCache", "CondensedGroup", "experience_tensors"]

logger = logging.getLogger(__name__)


@dataclass
class CondensedGroup:
    """The stored images of one (experience, class) group."""

    experience: int
    label: int
    images: torch.Tensor  # (n, C, H, W) on the CPU
    task: int = 0

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.images.shape[0] * 8


class CondensationCache:
    """Condensed experiences kept in memory, keyed by everything that determines them.

    A harness that runs the same policy under two protocols (replay, retrain) condenses each
    experience once: the result depends on the data, the method, its config, the share and the
    seed, not on the learner.
    """

    def __init__(self):
        self._store: dict[tuple, tuple[dict[int, torch.Tensor], float]] = {}

    def get(self, key: tuple) -> tuple[dict[int, torch.Tensor], float] | None:
        return self._store.get(key)

    def put(self, key: tuple, value: tuple[dict[int, torch.Tensor], float]) -> None:
        self._store[key] = value


def experience_tensors(dataset, *, batch_size: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, task labels) of an Avalanche dataset, read once through a loader."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    images, labels, tasks = [], [], []
    for batch in loader:
        if len(batch) < 2:
            raise ConfigError([f"an experience's samples must be (x, y[, t]) tuples; got "
                               f"{len(batch)} field(s)"], source="CondensedBuffer")
        images.append(batch[0])
        labels.append(torch.as_tensor(batch[1]))
        tasks.append(torch.as_tensor(batch[2]) if len(batch) > 2
                     else torch.zeros(len(batch[1]), dtype=torch.int64))
    if not images:
        raise ConfigError(["the experience has no samples; a memory cannot be condensed from "
                           "an empty experience"], source="CondensedBuffer")
    return torch.cat(images), torch.cat(labels).to(torch.int64), torch.cat(tasks)


class CondensedBuffer(ExemplarsBuffer):
    """Replay memory whose images a ddsuite method condenses from each experience.

    Args:
        max_size: images the memory may hold in total.
        method: a registered method name (`ddsuite list methods`).
        method_config: options of the method (its config fields, without `ipc`).
        total_num_groups: the number of (experience, class) groups the stream will bring, for a
            fixed share per group; None shares the memory among the groups seen so far.
        seed: seeds condensation and sub-sampling (experience k uses ``seed * 1000 + k``).
        device: where to condense.
        input_space: the input space of the experiences' tensors (recorded in provenance);
            None: the tensors are taken as they are.
        dataset_name: the dataset the experiences come from ("mnist", "digits", ...); methods
            resolve their per-dataset defaults from it.
        task_free: refuse experiences whose task labels are not all 0.
        cache: share condensed experiences with other buffers (see `CondensationCache`).

    Raises:
        UnknownNameError: `method` is not registered.
        ConfigError: a bad option of the method, or `max_size` < 1.
    """

    def __init__(self, max_size: int, *, method: str = "dm",
                 method_config: dict[str, Any] | None = None,
                 total_num_groups: int | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", input_space: InputSpace | None = None,
                 dataset_name: str = "experience", task_free: bool = True,
                 cache: CondensationCache | None = None):
        problems = []
        if isinstance(seed, bool) or not isinstance(seed, Integral):  # numpy ints too
            problems.append(f"seed must be an integer, got {seed!r}")
        problems.extend(device_problems(str(device)))
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            problems.append(f"max_size must be an integer >= 1, got {max_size!r}")
        if total_num_groups is not None and (isinstance(total_num_groups, bool)
                                             or not isinstance(total_num_groups, int)
                                             or total_num_groups < 1):
            problems.append(f"total_num_groups must be None or an integer >= 1, got "
                            f"{total_num_groups!r}")
        elif total_num_groups is not None and isinstance(max_size, int) \
                and max_size < total_num_groups:
            problems.append(f"max_size {max_size} cannot hold one image for each of the "
                            f"{total_num_groups} groups; allowed: max_size >= "
                            f"{total_num_groups}")
        options = dict(method_config or {})
        if "ipc" in options:
            problems.append("method_config must not set ipc: the memory share sets it")
        distiller = get_method(method)  # UnknownNameError lists the methods
        try:
            config = config_from_dict(distiller.Config, options, source=f"method {method!r}")
        except ConfigError as exc:
            problems.extend(exc.problems)
        else:
            # The memory replays images with hard labels, as stored, counted in images.
            if getattr(config, "soft_labels", False) or getattr(config, "learn_labels", False):
                problems.append(f"method {method!r} with soft or learnable labels: this memory "
                                "replays hard labels; turn soft labels off")
            if (getattr(config, "factor", 1) or 1) > 1:
                problems.append(f"method {method!r} with factor={config.factor} stores images "
                                "that decode to factor^2 images; this memory counts its budget "
                                "in stored images: use factor=1")
        if problems:
            raise ConfigError(problems, source="CondensedBuffer")
        super().__init__(max_size)
        self.method = method
        self.method_config = options
        self.total_num_groups = total_num_groups
        self.seed = int(seed)
        self.device = resolve_device(str(device))
        self.input_space = input_space
        self.dataset_name = dataset_name
        self.task_free = task_free
        self.cache = cache
        self.groups: dict[tuple[int, int], CondensedGroup] = {}
        self.condense_seconds: list[float] = []  # what condensing each experience cost
        self.update_seconds = 0.0  # wall time spent in updates here (cache hits are quick)
        self._num_updates = 0

    # -- what Avalanche calls --------------------------------------------------------------

    def post_adapt(self, agent_state, exp) -> None:
        """Condense `exp` into its groups' share and shrink older groups if needed."""
        start = time.perf_counter()
        experience = getattr(exp, "current_experience", None)
        experience = self._num_updates if experience is None else int(experience)
        self._num_updates += 1
        images, labels, tasks = experience_tensors(exp.dataset)
        task = int(tasks[0])
        if not self.task_free and bool((tasks != task).any()):
            raise ConfigError([f"experience {experience} mixes task labels "
                               f"{sorted(set(tasks.tolist()))}; a task-aware memory needs one "
                               "task label per experience"], source="CondensedBuffer")
        if self.task_free and bool((tasks != 0).any()):
            found = sorted(set(tasks.tolist()))
            raise ConfigError([f"experience {experience} carries task labels {found}, but this "
                               "memory is task-free (task label 0 only); build the benchmark "
                               "without task labels or pass task_free=False"],
                              source="CondensedBuffer")
        if int(labels.min()) < 0:
            raise ConfigError([f"experience {experience} has negative labels "
                               f"(min {int(labels.min())}); labels must be integers >= 0"],
                              source="CondensedBuffer")
        classes = sorted(set(labels.tolist()))
        new_keys = [(experience, c) for c in classes]
        num_groups = len(set(self.groups) | set(new_keys))
        share = self._share(num_groups)
        counts = {c: int((labels == c).sum()) for c in classes}
        short = {c: n for c, n in counts.items() if n < share}
        if short:
            listing = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items()))
            raise IPCError(f"experience {experience} has fewer images than the memory share of "
                           f"{share} per class ({listing}); lower max_size or give the memory "
                           "more groups (total_num_groups)")
        condensed, seconds = self._condense(images, labels, classes, share, experience)
        self.condense_seconds.append(seconds)
        for c in classes:
            self.groups[(experience, c)] = CondensedGroup(experience, c, condensed[c], task)
        self._shrink(share, experience)
        self._rebuild()
        self.update_seconds += time.perf_counter() - start
        logger.info("%s memory after experience %d: %d groups x %d = %d images (%d bytes), "
                    "condensed in %.1f s", self.method, experience, len(self.groups), share,
                    len(self), self.memory_bytes, seconds)

    def update(self, strategy, **kwargs) -> None:
        """Absorb the strategy's current experience (what Avalanche's `ReplayPlugin` calls)."""
        self.post_adapt(strategy, strategy.experience)

    def resize(self, strategy, new_size: int) -> None:
        """Set a new total size; groups above their new share are sub-sampled.

        Growing the memory does not grow groups already stored (their data is gone); the new
        room is used from the next experience on.
        """
        if new_size < max(1, len(self.groups)):
            raise ConfigError([f"new_size {new_size} cannot hold one image for each of the "
                               f"{len(self.groups)} groups stored; allowed: >= "
                               f"{max(1, len(self.groups))}"], source="CondensedBuffer")
        self.max_size = new_size
        if self.groups:
            self._shrink(self._share(len(self.groups)), self._num_updates)
            self._rebuild()

    def check_experience(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Check, without condensing, that the first experience can be condensed: its share,
        its class sizes, and the method built on it (raises what `post_adapt` would)."""
        classes = sorted(set(labels.tolist()))
        share = self._share(len(classes))
        short = {c: int((labels == c).sum()) for c in classes if int((labels == c).sum()) < share}
        if short:
            raise IPCError(f"the first experience has fewer images than the memory share of "
                           f"{share} per class ({short}); lower max_size")
        splits = self._experience_splits(images, labels, classes, 0, "precheck")
        config = config_from_dict(get_method(self.method).Config,
                                  {**self.method_config, "ipc": share})
        config = config.resolve(dataset=splits.identity.name)
        get_method(self.method)(config, splits=splits, device=self.device)

    # -- what the harness reads --------------------------------------------------------------

    def __len__(self) -> int:
        return sum(g.images.shape[0] for g in self.groups.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes of the stored images (float32) and their int64 labels."""
        return sum(g.nbytes for g in self.groups.values())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored images and labels, group by group in arrival order."""
        if not self.groups:
            raise ConfigError(["the memory is empty: no experience has been condensed yet"],
                              source="CondensedBuffer")
        groups = list(self.groups.values())
        images = torch.cat([g.images for g in groups])
        labels = torch.cat([torch.full((g.images.shape[0],), g.label, dtype=torch.int64)
                            for g in groups])
        return images, labels

    # -- internals ---------------------------------------------------------------------------

    def _share(self, num_groups: int) -> int:
        denominator = self.total_num_groups or num_groups
        if self.total_num_groups is not None and num_groups > self.total_num_groups:
            raise ConfigError([f"{num_groups} (experience, class) groups have arrived but the "
                               f"memory was sized for total_num_groups={self.total_num_groups}"],
                              source="CondensedBuffer")
        share = self.max_size // denominator
        if share < 1:
            raise ConfigError([f"a memory of {self.max_size} images cannot hold one image for "
                               f"each of the {num_groups} groups seen; allowed: max_size >= "
                               f"{num_groups}"], source="CondensedBuffer")
        return share

    def _condense(self, images: torch.Tensor, labels: torch.Tensor, classes: list[int],
                  share: int, experience: int) -> tuple[dict[int, torch.Tensor], float]:
        seed = self.seed * 1000 + experience
        fingerprint = fingerprint_tensors([("images", images), ("labels", labels)])
        key = (self.method, repr(sorted(self.method_config.items())), seed, share, fingerprint)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            logger.info("experience %d: condensed %s memory reused from the cache",
                        experience, self.method)
            return hit
        splits = self._experience_splits(images, labels, classes, experience, fingerprint)
        start = time.perf_counter()
        result = distill(self.method, splits=splits, config={**self.method_config, "ipc": share},
                         seed=seed, device=self.device, checkpoint_every=0,
                         extra_meta={"experience": experience})
        seconds = time.perf_counter() - start
        if result.syn.labels_soft is not None:
            raise UnsupportedFeatureError(
                f"method {self.method!r} produced soft labels; this memory replays hard labels")
        if result.syn.decode is not None:
            raise UnsupportedFeatureError(
                f"method {self.method!r} stores a compact code that decodes to more images "
                f"({result.syn.decode}); this memory stores images as they are and counts its "
                "budget in images. Use a method without a decoder (for idm: factor=1)")
        images_syn = result.syn.images_syn.detach().cpu()
        if not torch.isfinite(images_syn).all():
            raise ConfigError([f"the {self.method} memory of experience {experience} is not "
                               "finite"], source="CondensedBuffer")
        by_class = {c: images_syn[i * share:(i + 1) * share].clone()
                    for i, c in enumerate(classes)}
        if self.cache is not None:
            self.cache.put(key, (by_class, seconds))
        return by_class, seconds

    def _experience_splits(self, images: torch.Tensor, labels: torch.Tensor,
                           classes: list[int], experience: int,
                           fingerprint: str) -> DatasetSplits:
        """The experience as ddsuite splits: labels 0..k-1, the original ones in the map."""
        local = torch.searchsorted(torch.tensor(classes, dtype=torch.int64), labels)
        images = images.to(self.device, torch.float32)
        train = RealDataset(images, local.to(self.device), num_classes=len(classes),
                            class_names=[str(c) for c in classes])
        channels = images.shape[1]
        space = self.input_space or InputSpace(mean=[0.0] * channels, std=[1.0] * channels)
        # The dataset's own name, so methods resolve their per-dataset defaults (e.g. no flip
        # augmentation on digits) as they would on the whole dataset.
        identity = DatasetIdentity(
            name=self.dataset_name, source=f"avalanche experience {experience}",
            num_classes=len(classes), image_shape=tuple(images.shape[1:]),
            num_train=images.shape[0], num_test=0, class_names=[str(c) for c in classes],
            class_map=classes, fingerprint=fingerprint)
        # There is no test split: experiences are condensed here, never evaluated.
        return DatasetSplits(train, train, identity, space)

    def _shrink(self, share: int, experience: int) -> None:
        """Sub-sample every group holding more than `share` images (seeded)."""
        generator = torch.Generator().manual_seed(self.seed * 1000 + 500 + experience)
        for key, group in self.groups.items():
            n = group.images.shape[0]
            if n > share:
                keep = torch.randperm(n, generator=generator)[:share].sort().values
                self.groups[key] = CondensedGroup(group.experience, group.label,
                                                  group.images[keep], group.task)
                logger.info("group %s sub-sampled from %d to %d images", key, n, share)

    def _rebuild(self) -> None:
        images, labels = self.tensors()
        tasks = [g.task for g in self.groups.values() for _ in range(g.images.shape[0])]
        self.buffer = tensor_dataset(images, labels, task_label=tasks)
