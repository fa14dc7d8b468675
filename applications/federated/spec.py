"""The typed description of one federated method, shared by client, server and harness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ddsuite.core.errors import ConfigError
from ddsuite.core.methods import config_from_dict, get_method, list_methods

from .training import TrainSpec

__all__ = ["DISTILLED_KINDS", "METHOD_KINDS", "FederatedMethod"]

METHOD_KINDS = ("oneshot", "multiround", "fedavg", "fedprox", "centralised")
DISTILLED_KINDS = ("oneshot", "multiround")


@dataclass(kw_only=True)
class FederatedMethod:
    """One way to train the global model from the clients' data.

    Kinds:
        oneshot: each client distils its shard once with `distiller` and uploads the set;
            the server trains the global model on the union (one round, nothing sent down).
        multiround: `rounds` rounds; the server broadcasts the global model, each client
            distils around it (the distiller's networks are the global model plus Gaussian
            noise of `model_noise` times each tensor's std, FedDM-style), uploads, and the
            server trains the global model on the round's union, starting from its weights.
        fedavg: `rounds` rounds of model averaging; clients train `local` on their shard.
        fedprox: FedAvg with the proximal term of weight `mu`.
        centralised: every client uploads its raw shard once; the server trains on all of
            it (the upper bound, with the bytes that costs).
    """

    kind: str
    label: str | None = None
    rounds: int = 1
    distiller: str = "dm"
    ipc: int = 10
    distill: dict[str, Any] = field(default_factory=dict)
    model_noise: float = 0.01
    mu: float = 0.01
    local: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=1, lr=0.01))
    server: TrainSpec = field(default_factory=lambda: TrainSpec(epochs=300, lr=0.01,
                                                                batch_size=256))

    @property
    def name(self) -> str:
        """The name the method is reported under: its label, else its kind."""
        return self.label or self.kind

    @property
    def distils(self) -> bool:
        return self.kind in DISTILLED_KINDS

    @property
    def averages(self) -> bool:
        return self.kind in ("fedavg", "fedprox")

    def problems(self) -> list[str]:
        out = []
        if self.kind not in METHOD_KINDS:
            return [f"kind: {self.kind!r} is not one of {', '.join(METHOD_KINDS)}"]
        if self.rounds < 1:
            out.append(f"rounds: must be >= 1, got {self.rounds}")
        if self.kind in ("oneshot", "centralised") and self.rounds != 1:
            out.append(f"rounds: {self.kind} sends data once; rounds must be 1, got "
                       f"{self.rounds}")
        if self.label is not None and (not self.label.strip() or "|" in self.label):
            out.append(f"label: expected a non-empty name without '|', got {self.label!r}")
        if self.distils:
            out.extend(self.distiller_problems())
        if self.kind == "multiround" and not self.model_noise >= 0:
            out.append(f"model_noise: must be >= 0, got {self.model_noise}")
        if self.kind == "fedprox" and not self.mu > 0:
            out.append(f"mu: FedProx's proximal weight must be > 0 (use kind fedavg for 0), "
                       f"got {self.mu}")
        for name in ("local", "server"):
            out.extend(f"{name}.{p}" for p in getattr(self, name).problems())
        return out

    def distiller_problems(self) -> list[str]:
        if self.distiller not in list_methods():
            return [f"distiller: {self.distiller!r} is not a registered method; allowed: "
                    f"{', '.join(list_methods())}"]
        if self.ipc < 1:
            return [f"ipc: must be >= 1, got {self.ipc}"]
        if "ipc" in self.distill:
            return ["distill.ipc: set ipc beside distiller, not inside distill"]
        if hasattr(get_method(self.distiller), "privacy_record"):
            return [f"distiller: {self.distiller!r} is a private distiller, and a federation "
                    "does not yet compose each client's privacy over its uploads or record "
                    "it, so its guarantee would go unreported; use a non-private distiller "
                    f"({', '.join(m for m in list_methods() if m in ('dm', 'dc', 'idm'))}, ...)"]
        try:
            config_from_dict(get_method(self.distiller).Config, self.distill_options(None))
        except ConfigError as exc:
            return [f"distill.{p}" for p in exc.problems]
        return []

    def distill_options(self, model: str | None) -> dict[str, Any]:
        """The distiller's options: `distill`, `ipc`, and `model` (the global model's spec,
        unless `distill` names one; multiround always distils through the global model)."""
        options = {**self.distill, "ipc": self.ipc}
        fields = get_method(self.distiller).Config.__dataclass_fields__
        if model and "model" in fields and (self.kind == "multiround" or "model" not in options):
            options["model"] = model
        return options
