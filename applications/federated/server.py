"""The server's side of every method, and the round loop both engines share.

`run_federation` is the whole federated algorithm: for each round it hands the global state
to an `exchange` (which delivers it to the clients and returns their replies: in process,
`InProcessExchange`; on Flower, the exchange in `flower.py`), checks every reply, updates the
global model and scores it on the test split. Bytes are counted here from the tensors that
actually travel, in both directions.

A reply that fails its checks (non-finite values, wrong shapes, labels outside the classes,
an update that does not fit the model) is left out of the round with a warning naming the
client; a round with nothing usable keeps the global model as it was. A global model that
turns non-finite in training is likewise rolled back with a warning, so the global model is
never NaN.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ddsuite.core.synthetic.decode import decode_set

from .client import ClientData, client_seed, client_step, global_model
from .payload import ModelUpdate, Payload, payload_problems, update_problems
from .spec import FederatedMethod
from .training import fit_model, model_accuracy, state_bytes, state_is_finite

__all__ = ["Exchange", "FederationHistory", "InProcessExchange", "RoundRecord",
           "accepted_replies", "average_updates", "run_federation", "train_on_payloads"]

logger = logging.getLogger(__name__)

# The server trains with seeds no client uses.
_SERVER = 2**20

Exchange = Callable[[int, "dict[str, Tensor] | None"], Sequence["Payload | ModelUpdate"]]
"""(round, global state or None) -> the clients' replies; the state goes to every client."""


@dataclass
class RoundRecord:
    """What one round cost and gave."""

    round: int
    accuracy: float
    bytes_up: int
    bytes_down: int
    accepted: list[int]
    rejected: dict[int, list[str]]
    seconds: float
    client_info: dict[int, dict[str, Any]] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    """Clients that sent no reply at all (a Flower node that failed, say)."""


@dataclass
class FederationHistory:
    """Every round of one method, and the final global model's state."""

    method: str
    rounds: list[RoundRecord]
    state: dict[str, Tensor]
    initial_accuracy: float

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy

    @property
    def bytes_up(self) -> int:
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down(self) -> int:
        return sum(r.bytes_down for r in self.rounds)

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "initial_accuracy": self.initial_accuracy,
            "final_accuracy": self.final_accuracy, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "total_bytes": self.total_bytes,
            "rounds": [{**r.__dict__, "rejected": {str(k): v for k, v in r.rejected.items()},
                        "client_info": {str(k): v for k, v in r.client_info.items()}}
                       for r in self.rounds],
        }


class InProcessExchange:
    """Deliver the global state to every client by calling `client_step` in this process.

    A client that raises stops the run (in process, an error is a bug to see at once).
    """

    def __init__(self, method: FederatedMethod, clients: Sequence[ClientData], *, model: str,
                 seed: int, device: torch.device | str):
        self.method, self.clients, self.model = method, list(clients), model
        self.seed, self.device = seed, device

    def __call__(self, round_: int, state: dict[str, Tensor] | None
                 ) -> list[Payload | ModelUpdate]:
        return [client_step(self.method, data, round_=round_, model=self.model,
                            global_state=state, seed=self.seed, device=self.device)
                for data in self.clients]


def accepted_replies(replies: Sequence[Payload | ModelUpdate], *, method: FederatedMethod,
                     image_shape: tuple[int, ...], num_classes: int,
                     reference: dict[str, Tensor], round_: int
                     ) -> tuple[list[Payload | ModelUpdate], dict[int, list[str]]]:
    """The replies the server may use, and the problems of each one it rejects."""
    accepted, rejected = [], {}
    want = ModelUpdate if method.averages else Payload
    for reply in replies:
        if not isinstance(reply, want):
            problems = [f"expected a {want.__name__}, got {type(reply).__name__}"]
        elif isinstance(reply, Payload):
            problems = payload_problems(reply, image_shape=image_shape, num_classes=num_classes)
        else:
            problems = update_problems(reply, reference=reference)
        client = getattr(reply, "client", -1)
        if problems:
            logger.warning("round %d: rejected the reply of client %s (%s); the round carries "
                           "on without it", round_, client, "; ".join(problems))
            rejected[client] = problems
        else:
            accepted.append(reply)
    return accepted, rejected


def average_updates(updates: Sequence[ModelUpdate]) -> dict[str, Tensor]:
    """FedAvg: the example-weighted mean of the clients' states (integer buffers: the first
    client's)."""
    total = sum(u.num_examples for u in updates)
    out = {}
    for key, first in updates[0].state.items():
        if first.is_floating_point():
            out[key] = sum(u.state[key].double() * (u.num_examples / total)
                           for u in updates).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def train_on_payloads(model: torch.nn.Module, payloads: Sequence[Payload], *,
                      method: FederatedMethod, seed: int, device: torch.device | str) -> int:
    """Train `model` in place on the union of the payloads; returns the images trained on.

    Soft labels are used when every payload has them, hard labels otherwise.
    """
    decoded = [decode_set(p.images_syn, p.labels_syn, p.labels_soft, p.decode, p.tensors())
               for p in payloads]
    images = torch.cat([d[0] for d in decoded]).to(device)  # (n, C, H, W)
    soft = all(d[2] is not None for d in decoded)
    targets = torch.cat([d[2] if soft else d[1] for d in decoded]).to(device)
    if images.shape[0]:
        fit_model(model, images, targets, spec=method.server, seed=seed)
    return int(images.shape[0])


def run_federation(method: FederatedMethod, *, exchange: Exchange, splits, model: str,
                   seed: int, device: torch.device | str, num_clients: int,
                   on_round: Callable[[RoundRecord], None] | None = None
                   ) -> FederationHistory:
    """Run `method` for its rounds through `exchange`; score the global model after each.

    Args:
        method: what clients and server do.
        exchange: delivers the global state (or None) and returns the clients' replies.
        splits: the dataset; the global model is scored on `splits.test`.
        model: the global model's spec.
        seed: the global model's initialisation and every client's seeds.
        device: where the server trains and scores.
        num_clients: how many clients receive the broadcast (for the down-link bytes).
        on_round: called with each finished round's record.
    """
    device = torch.device(device)
    net = global_model(model, splits, device=device, seed=seed)
    test_images, test_labels = splits.test.images.to(device), splits.test.labels.to(device)
    initial = model_accuracy(net, test_images, test_labels)
    image_shape, num_classes = splits.train.image_shape, splits.train.num_classes
    broadcasts = method.kind in ("multiround", "fedavg", "fedprox")
    rounds = []
    for round_ in range(1, method.rounds + 1):
        start = time.perf_counter()
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        sent = state if broadcasts else None
        replies = exchange(round_, sent)
        bytes_down = state_bytes(state) * num_clients if broadcasts else 0
        bytes_up = sum(r.num_bytes for r in replies)
        missing = sorted(set(range(num_clients))
                         - {getattr(r, "client", None) for r in replies})
        if missing:
            logger.warning("round %d of %s: no reply from client(s) %s; the round carries on "
                           "without them", round_, method.name, missing)
        accepted, rejected = accepted_replies(
            replies, method=method, image_shape=image_shape, num_classes=num_classes,
            reference=state, round_=round_)
        server_seed = client_seed(seed, round_, _SERVER)
        if not accepted:
            logger.warning("round %d of %s: no usable reply; the global model is unchanged",
                           round_, method.name)
        elif method.averages:
            net.load_state_dict({k: v.to(device) for k, v in average_updates(accepted).items()})
        else:
            train_on_payloads(net, accepted, method=method, seed=server_seed, device=device)
        if not state_is_finite(net.state_dict()):
            logger.warning("round %d of %s: the global model became non-finite; it is rolled "
                           "back to the previous round's", round_, method.name)
            net.load_state_dict({k: v.to(device) for k, v in state.items()})
        record = RoundRecord(
            round=round_, accuracy=model_accuracy(net, test_images, test_labels),
            bytes_up=bytes_up, bytes_down=bytes_down,
            accepted=sorted(r.client for r in accepted), rejected=rejected,
            seconds=time.perf_counter() - start,
            client_info={r.client: dict(r.info) for r in replies if hasattr(r, "client")},
            missing=missing)
        rounds.append(record)
        logger.info("%s round %d/%d: accuracy %.2f%%, %d bytes up, %d bytes down",
                    method.name, round_, method.rounds, 100 * record.accuracy, bytes_up,
                    bytes_down)
        if on_round is not None:
            on_round(record)
    final = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return FederationHistory(method=method.name, rounds=rounds, state=final,
                             initial_accuracy=initial)
