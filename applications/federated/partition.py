"""Split a labelled training set among federated clients: Dirichlet label skew, IID, shards.

Every scheme is seeded (numpy's PCG64 from `seed`), so a partition is reproducible. Each
client receives at least `min_size` samples: a Dirichlet draw that leaves a client short is
redrawn (up to `max_redraws` times) and then refused with an error that says what to change.

Example:
    >>> import torch
    >>> labels = torch.arange(10).repeat(30)
    >>> part = partition_labels(labels, num_clients=3, scheme="dirichlet", alpha=0.5, seed=0)
    >>> [len(i) for i in part.indices] == part.sizes and sum(part.sizes) == 300
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddsuite.core.errors import ConfigError

__all__ = ["PARTITION_SCHEMES", "Partition", "partition_labels", "partition_problems"]

PARTITION_SCHEMES = ("dirichlet", "iid", "shards")


@dataclass
class Partition:
    """Which training samples each client holds.

    Attributes:
        indices: one LongTensor of sample indices per client (sorted), disjoint, covering
            every sample.
        histograms: (clients, classes) int64 counts of each class at each client.
        scheme: the scheme that drew it, with `alpha` / `shards_per_client` and `seed`.
        redraws: how many Dirichlet draws were refused for leaving a client short.
    """

    indices: list[torch.Tensor]
    histograms: torch.Tensor
    scheme: str
    seed: int
    alpha: float | None = None
    shards_per_client: int | None = None
    redraws: int = 0

    @property
    def num_clients(self) -> int:
        return len(self.indices)

    @property
    def sizes(self) -> list[int]:
        return [int(i.numel()) for i in self.indices]

    def label_skew(self) -> float:
        """Mean total-variation distance between each client's class distribution and the
        global one: 0 for identical distributions, towards 1 for one class per client."""
        counts = self.histograms.double()
        local = counts / counts.sum(dim=1, keepdim=True)
        overall = counts.sum(dim=0) / counts.sum()
        return float(0.5 * (local - overall).abs().sum(dim=1).mean())

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "seed": self.seed, "alpha": self.alpha,
                "shards_per_client": self.shards_per_client, "redraws": self.redraws,
                "sizes": self.sizes, "label_skew": self.label_skew(),
                "histograms": self.histograms.tolist()}


def partition_problems(*, num_samples: int, num_clients: int, scheme: str,
                       alpha: float | None, shards_per_client: int, min_size: int) -> list[str]:
    """Every problem with these partition settings (empty when they can be drawn)."""
    out = []
    if scheme not in PARTITION_SCHEMES:
        out.append(f"scheme: {scheme!r} is not one of {', '.join(PARTITION_SCHEMES)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        out.append(f"num_clients: must be an integer >= 1, got {num_clients!r}")
        return out
    if num_clients > num_samples:
        out.append(f"num_clients: {num_clients} clients cannot each hold a sample of a "
                   f"training set of {num_samples}; use at most {num_samples} clients")
    if min_size < 1:
        out.append(f"min_size: every client needs data; must be >= 1, got {min_size}")
    elif min_size * num_clients > num_samples and num_clients <= num_samples:
        out.append(f"min_size: {num_clients} clients of at least {min_size} samples need "
                   f"{min_size * num_clients}, the training set has {num_samples}; lower "
                   f"min_size to at most {num_samples // num_clients}")
    if scheme == "dirichlet" and (alpha is None or not alpha > 0):
        out.append(f"alpha: the Dirichlet concentration must be > 0 (0.1: strong label skew, "
                   f"100: nearly IID), got {alpha!r}")
    if scheme == "shards":
        if shards_per_client < 1:
            out.append(f"shards_per_client: must be >= 1, got {shards_per_client}")
        elif num_clients * shards_per_client > num_samples:
            out.append(f"shards_per_client: {num_clients} x {shards_per_client} shards "
                       f"exceed the {num_samples} samples, leaving clients without data; "
                       "lower shards_per_client or num_clients")
    return out


def partition_labels(labels: torch.Tensor, *, num_clients: int, scheme: str = "dirichlet",
                     alpha: float | None = 0.5, shards_per_client: int = 2, min_size: int = 10,
                     seed: int = 0, max_redraws: int = 1000) -> Partition:
    """Split sample indices among `num_clients` clients.

    Args:
        labels: (N,) integer class labels 0..C-1 of the training set.
        num_clients: how many clients.
        scheme: "dirichlet" (each class spread over clients by proportions drawn from
            Dir(alpha)), "iid" (a random equal split) or "shards" (samples sorted by label,
            cut into `num_clients * shards_per_client` equal shards, dealt at random).
        alpha: the Dirichlet concentration; smaller is more skewed. Dirichlet only.
        shards_per_client: shards per client. Shards only.
        min_size: the fewest samples a client may hold.
        seed: seeds every random draw.
        max_redraws: Dirichlet draws to try before refusing.

    Raises:
        ConfigError: naming each bad value and what is allowed, or when no draw in
            `max_redraws` gives every client `min_size` samples.
    """
    labels = torch.as_tensor(labels).detach().cpu().long()
    n = int(labels.numel())
    problems = partition_problems(num_samples=n, num_clients=num_clients, scheme=scheme,
                                  alpha=alpha, shards_per_client=shards_per_client,
                                  min_size=min_size)
    if problems:
        raise ConfigError(problems, source="partition")
    y = labels.numpy()
    num_classes = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    redraws = 0
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "shards":
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, num_clients * shards_per_client)
        dealt = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in dealt]
    else:
        parts = None
        for redraws in range(max_redraws):  # noqa: B007  (the count is reported)
            parts = _dirichlet_draw(y, num_classes, num_clients, alpha, rng)
            if min(len(p) for p in parts) >= min_size:
                break
        else:
            raise ConfigError([
                f"alpha: {max_redraws} Dirichlet draws at alpha {alpha} all left a client with "
                f"fewer than min_size {min_size} samples ({num_clients} clients, {n} samples); "
                "raise alpha, lower min_size or use fewer clients"], source="partition")
    short = [k for k, p in enumerate(parts) if len(p) < min_size]
    if short:
        raise ConfigError([f"clients {short} hold fewer than min_size {min_size} samples "
                           f"under {scheme}; lower min_size or use fewer clients"],
                          source="partition")
    indices = [torch.from_numpy(np.sort(p)).long() for p in parts]
    histograms = torch.stack([torch.bincount(labels[i], minlength=num_classes)
                              for i in indices])  # (clients, classes)
    return Partition(indices=indices, histograms=histograms, scheme=scheme, seed=seed,
                     alpha=alpha if scheme == "dirichlet" else None,
                     shards_per_client=shards_per_client if scheme == "shards" else None,
                     redraws=redraws)


def _dirichlet_draw(y: np.ndarray, num_classes: int, num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """One Dirichlet label-skew draw: class c's samples cut by proportions ~ Dir(alpha)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for k, piece in enumerate(np.split(members, cuts)):
            parts[k].append(piece)
    return [np.concatenate(p) for p in parts]
