"""What a federated client does with its shard, as plain functions.

`client_step` is the one entry point: the in-process runner calls it directly and the Flower
`ClientApp` calls it on the message it receives. Depending on the method it

- distils the shard with a registered distiller (`distil_payload`), around the broadcast
  global model for ``multiround``;
- trains the broadcast global model on the shard (`local_update`, FedAvg / FedProx);
- uploads the shard as it is (`raw_payload`, the centralised bound).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ddsuite.core.data import DatasetSplits, RealDataset
from ddsuite.core.data.identity import fingerprint_tensors
from ddsuite.core.engine import distill
from ddsuite.core.engine.callbacks import Callback
from ddsuite.core.models import build_model
from ddsuite.core.synthetic.hallucinate import DECODER_PREFIX

from .payload import ModelUpdate, Payload
from .spec import FederatedMethod
from .training import fit_model

__all__ = ["AroundGlobalModel", "ClientData", "client_data", "client_seed", "client_step",
           "distil_payload", "global_model", "local_update", "raw_payload"]

logger = logging.getLogger(__name__)


@dataclass
class ClientData:
    """One client's shard of the training split, in the dataset's input space.

    Attributes:
        client: the client's index.
        images: (n, C, H, W) float32.
        labels: (n,) int64 labels in the global numbering.
        splits: the whole dataset the shard was cut from (for its identity, input space and
            class names; the shard's own images are `images`).
    """

    client: int
    images: Tensor
    labels: Tensor
    splits: DatasetSplits

    @property
    def num_classes(self) -> int:
        return self.splits.train.num_classes

    @property
    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()


def client_data(splits: DatasetSplits, indices: Tensor, *, client: int) -> ClientData:
    """The shard `indices` of `splits.train` as client `client`'s data."""
    indices = indices.to(splits.train.images.device)
    return ClientData(client=client, images=splits.train.images[indices],
                      labels=splits.train.labels[indices], splits=splits)


def client_seed(seed: int, round_: int, client: int) -> int:
    """The seed of client `client`'s work in round `round_` (distinct for every pair)."""
    return (seed * 1_000_003 + round_ * 10_007 + client) % (2**63 - 1)


def global_model(spec: str, splits: DatasetSplits, *, device: torch.device | str,
                 state: dict[str, Tensor] | None = None, seed: int | None = None) -> nn.Module:
    """The global model for `splits`: freshly initialised from `seed`, or holding `state`."""
    c, h, w = splits.train.image_shape
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(spec, in_channels=c, num_classes=splits.train.num_classes,
                            image_size=(h, w), device=device)
    if state is not None:
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    return model


# -- distilled uploads -----------------------------------------------------------------------

class _LocalClasses(nn.Module):
    """A global model seen through a client's classes: logits of those classes only, so a
    distiller's local labels 0..k-1 line up with them; `embed` is the global model's."""

    def __init__(self, net: nn.Module, class_ids: Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("class_ids", class_ids)
        self.feature_dim = getattr(net, "feature_dim", None)

    def embed(self, x: Tensor) -> Tensor:
        return self.net.embed(x)

    def classifier(self, features: Tensor) -> Tensor:
        return self.net.classifier(features)[:, self.class_ids]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[:, self.class_ids]


class AroundGlobalModel(Callback):
    """Make a distiller draw its networks around the broadcast global model (FedDM-style).

    Every network the distiller asks for with `fresh_model()` (its configured model) is the
    global model plus Gaussian noise of `noise` times each tensor's standard deviation, drawn
    from the global RNG the engine seeds per iteration, and restricted to the client's
    classes. Networks of another spec (e.g. a separate feature model) are left as they are.
    """

    def __init__(self, model: nn.Module, class_ids: Tensor, *, noise: float):
        self.model = model
        self.class_ids = class_ids
        self.noise = noise

    def on_start(self, ctx) -> None:
        distiller = ctx.distiller
        own_spec = distiller.config.model
        stock = distiller.fresh_model

        def around_global(spec: str | None = None) -> nn.Module:
            if spec is not None and spec != own_spec:
                return stock(spec)
            net = copy.deepcopy(self.model)
            with torch.no_grad():
                for p in net.parameters():
                    if self.noise and p.numel() > 1:
                        p.add_(torch.randn_like(p) * (self.noise * p.std()))
            return _LocalClasses(net, self.class_ids.to(ctx.device))

        distiller.fresh_model = around_global


def _local_splits(data: ClientData, classes: list[int]) -> DatasetSplits:
    """The shard's images of `classes` as a dataset of len(classes) classes (0..k-1)."""
    keep = torch.isin(data.labels, torch.tensor(classes, device=data.labels.device))
    images = data.images[keep]
    remap = torch.full((data.num_classes,), -1, dtype=torch.int64, device=data.labels.device)
    remap[torch.tensor(classes, device=remap.device)] = torch.arange(len(classes),
                                                                     device=remap.device)
    labels = remap[data.labels[keep]]
    identity = data.splits.identity
    names = [identity.class_names[c] for c in classes]
    train = RealDataset(images, labels, num_classes=len(classes), class_names=names)
    # Distillers never read the test split; the shard stands in for it.
    test = RealDataset(images, labels, num_classes=len(classes), class_names=names,
                       split="test")
    local_identity = dataclasses.replace(
        identity, num_classes=len(classes), class_names=names,
        class_map=[identity.class_map[c] for c in classes], num_train=len(train),
        num_test=len(test), fingerprint=fingerprint_tensors([("images", images.cpu()),
                                                     ("labels", labels.cpu())]))
    return DatasetSplits(train=train, test=test, identity=local_identity,
                         input_space=data.splits.input_space)


def distil_payload(method: FederatedMethod, data: ClientData, *, model: str, seed: int,
                   device: torch.device | str,
                   global_state: dict[str, Tensor] | None = None) -> Payload:
    """Distil the client's shard into `method.ipc` images per class and return the upload.

    Only classes with at least `ipc` images are distilled (a distiller needs `ipc` distinct
    real images per class to start from); the others are listed in ``info["skipped"]``.
    With `global_state` the distiller's networks are drawn around that model.
    """
    counts = data.class_counts
    classes = [c for c, n in enumerate(counts) if n >= method.ipc]
    skipped = {c: n for c, n in enumerate(counts) if 0 < n < method.ipc}
    info = {"num_examples": int(data.labels.numel()), "classes": classes,
            "skipped": sorted(skipped)}
    if skipped:
        logger.info("client %d: classes %s hold fewer than ipc %d images and are not uploaded",
                    data.client, sorted(skipped), method.ipc)
    c, h, w = data.splits.train.image_shape
    if not classes:
        logger.warning("client %d has no class with %d images; it uploads nothing",
                       data.client, method.ipc)
        return Payload(client=data.client, images_syn=torch.zeros(0, c, h, w),
                       labels_syn=torch.zeros(0, dtype=torch.int64), info=info)
    local = _local_splits(data, classes).to(device)
    class_ids = torch.tensor(classes, dtype=torch.int64)
    callbacks = []
    if global_state is not None:
        net = global_model(model, data.splits, device=device, state=global_state)
        callbacks.append(AroundGlobalModel(net, class_ids, noise=method.model_noise))
    result = distill(method.distiller, splits=local, config=method.distill_options(model),
                     seed=seed, device=device, callbacks=callbacks)
    tensors = result.syn.tensors()  # detached CPU copies
    soft = tensors.get("labels_soft")
    if soft is not None:
        # Classes the client never saw get a logit far below its lowest: probability ~0.
        full = soft.min(dim=1, keepdim=True).values - 30.0
        soft = full.expand(-1, data.num_classes).clone()
        soft[:, class_ids] = tensors["labels_soft"]
    info["distill_seconds"] = result.seconds
    decoder = {k: v for k, v in tensors.items() if k.startswith(DECODER_PREFIX)}
    return Payload(client=data.client, images_syn=tensors["images_syn"],
                   labels_syn=class_ids[tensors["labels_syn"]], labels_soft=soft,
                   decode=result.syn.decode, decoder=decoder or None, info=info)


def raw_payload(data: ClientData) -> Payload:
    """The client's shard itself, for the centralised upper bound."""
    return Payload(client=data.client, images_syn=data.images.detach().cpu().clone(),
                   labels_syn=data.labels.detach().cpu().clone(),
                   info={"num_examples": int(data.labels.numel())})


# -- model updates ---------------------------------------------------------------------------

def local_update(method: FederatedMethod, data: ClientData, *, model: str,
                 global_state: dict[str, Tensor], seed: int,
                 device: torch.device | str) -> ModelUpdate:
    """Train the broadcast global model on the shard (FedAvg; FedProx with `method.mu`)."""
    net = global_model(model, data.splits, device=device, state=global_state)
    mu = method.mu if method.kind == "fedprox" else 0.0
    loss = fit_model(net, data.images.to(device), data.labels.to(device), spec=method.local,
                     seed=seed, prox_mu=mu, anchor=global_state if mu else None)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return ModelUpdate(client=data.client, state=state, num_examples=int(data.labels.numel()),
                       info={"num_examples": int(data.labels.numel()), "loss": loss})


def client_step(method: FederatedMethod, data: ClientData, *, round_: int, model: str,
                global_state: dict[str, Tensor] | None, seed: int,
                device: torch.device | str) -> Payload | ModelUpdate:
    """Client `data.client`'s work in round `round_` (1-based) of `method`."""
    seed_ = client_seed(seed, round_, data.client)
    if method.kind == "centralised":
        return raw_payload(data)
    if method.distils:
        state = global_state if method.kind == "multiround" else None
        return distil_payload(method, data, model=model, seed=seed_, device=device,
                              global_state=state)
    if global_state is None:
        raise ValueError(f"{method.kind} clients need the global model's state")
    return local_update(method, data, model=model, global_state=global_state, seed=seed_,
                        device=device)
