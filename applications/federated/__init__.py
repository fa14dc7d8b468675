"""Federated learning where clients upload distilled sets, on Flower or in process.

Plain functions do the work; two engines carry it:

- in process: `run_federation(method, exchange=InProcessExchange(...), ...)`;
- Flower (Message API, Ray-backed simulation): `run_on_flower(...)`, or
  `make_client_app` / `make_server_app` for your own deployment.

Partitions (`partition_labels`: Dirichlet, IID, shards), the method description
(`FederatedMethod`: oneshot, multiround, fedavg, fedprox, centralised) and the "federated"
scenario kind (`ddsuite run federated-digits`) complete it. Flower is imported only by the
Flower engine, so everything else works without it.
"""

from .client import ClientData, client_data, client_step, distil_payload, local_update
from .partition import PARTITION_SCHEMES, Partition, partition_labels
from .payload import ModelUpdate, Payload, payload_problems, update_problems
from .server import (
    FederationHistory,
    InProcessExchange,
    RoundRecord,
    average_updates,
    run_federation,
)
from .spec import METHOD_KINDS, FederatedMethod
from .training import TrainSpec, fit_model, model_accuracy, tensor_bytes

__all__ = [
    "METHOD_KINDS",
    "PARTITION_SCHEMES",
    "ClientData",
    "FederatedMethod",
    "FederationHistory",
    "InProcessExchange",
    "ModelUpdate",
    "Partition",
    "Payload",
    "RoundRecord",
    "TrainSpec",
    "average_updates",
    "client_data",
    "client_step",
    "distil_payload",
    "fit_model",
    "local_update",
    "make_client_app",
    "make_server_app",
    "model_accuracy",
    "partition_labels",
    "payload_problems",
    "run_federation",
    "run_on_flower",
    "tensor_bytes",
    "update_problems",
]


def __getattr__(name: str):
    """The Flower engine, imported on first use (it needs flwr)."""
    if name in ("make_client_app", "make_server_app", "run_on_flower"):
        from . import flower

        return getattr(flower, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
