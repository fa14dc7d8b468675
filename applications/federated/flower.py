"""Flower apps that carry distilled payloads, model updates and the global model.

`make_client_app` and `make_server_app` build a `ClientApp` / `ServerApp` pair on Flower's
Message API; `run_on_flower` runs them on Flower's Ray-backed simulation engine. They add no
federated logic of their own: the ServerApp runs `run_federation` with an exchange that sends
the global state to every node as a ``train`` message, and the ClientApp answers each message
with `client_step` on its node's shard. The same apps run on a real deployment with
``flwr run`` (each node's `load_client` then reads that node's own data).

Messages:
    server -> client: ``config`` (ConfigRecord: round), ``global`` (ArrayRecord: the global
        model's state; absent for one-shot and centralised).
    client -> server: ``payload`` (ArrayRecord: images_syn, labels_syn[, labels_soft]) or
        ``update`` (ArrayRecord: the trained state), and ``info`` (ConfigRecord: client,
        num_examples, decode factor, the client's report as JSON).

A node whose ClientApp fails answers with an error message; the server logs it, naming the
node, and the round carries on without it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.core.synthetic.hallucinate import DECODER_PREFIX

from .client import ClientData, client_step
from .payload import ModelUpdate, Payload
from .server import FederationHistory, run_federation
from .spec import FederatedMethod

__all__ = ["decode_instruction", "decode_reply", "encode_instruction", "encode_reply",
           "make_client_app", "make_server_app", "ray_backend_config", "run_on_flower"]

logger = logging.getLogger(__name__)


# -- messages --------------------------------------------------------------------------------

def encode_instruction(round_: int, state: dict[str, Tensor] | None):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    content = RecordDict({"config": ConfigRecord({"round": round_})})
    if state is not None:
        content["global"] = ArrayRecord(torch_state_dict=state)
    return content


def decode_instruction(content) -> tuple[int, dict[str, Tensor] | None]:
    round_ = int(content["config"]["round"])
    state = content["global"].to_torch_state_dict() if "global" in content else None
    return round_, state


def encode_reply(reply: Payload | ModelUpdate):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    info: dict[str, Any] = {"client": reply.client, "report": json.dumps(reply.info)}
    if isinstance(reply, Payload):
        info["decode"] = json.dumps(reply.decode)
        arrays = ArrayRecord(torch_state_dict=reply.tensors())
        return RecordDict({"payload": arrays, "info": ConfigRecord(info)})
    info["num_examples"] = reply.num_examples
    return RecordDict({"update": ArrayRecord(torch_state_dict=reply.state),
                       "info": ConfigRecord(info)})


def decode_reply(content) -> Payload | ModelUpdate:
    info = content["info"]
    report = json.loads(info["report"])
    if "payload" in content:
        tensors = content["payload"].to_torch_state_dict()
        decoder = {k: v for k, v in tensors.items() if k.startswith(DECODER_PREFIX)}
        return Payload(client=int(info["client"]), images_syn=tensors["images_syn"],
                       labels_syn=tensors["labels_syn"], labels_soft=tensors.get("labels_soft"),
                       decode=json.loads(info["decode"]), decoder=decoder or None,
                       info=report)
    return ModelUpdate(client=int(info["client"]), state=content["update"].to_torch_state_dict(),
                       num_examples=int(info["num_examples"]), info=report)


# -- apps ------------------------------------------------------------------------------------

def make_client_app(method: FederatedMethod, load_client: Callable[[int], ClientData], *,
                    model: str, seed: int, device: str = "cpu"):
    """A `ClientApp` that answers ``train`` messages with `client_step`.

    Args:
        method: what the client does.
        load_client: partition id -> that node's `ClientData` (must pickle: Ray ships it to
            its workers; cache inside it so a worker loads its data once).
        model: the global model's spec.
        seed: the federation's seed (clients derive theirs from it).
        device: where the client computes.
    """
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context) -> Message:
        partition = int(context.node_config["partition-id"])
        round_, state = decode_instruction(msg.content)
        reply = client_step(method, load_client(partition), round_=round_, model=model,
                            global_state=state, seed=seed, device=device)
        return Message(content=encode_reply(reply), reply_to=msg)

    return app


def make_server_app(method: FederatedMethod, *, splits, model: str, seed: int,
                    device: torch.device | str, num_clients: int,
                    results: list[FederationHistory], stop: threading.Event | None = None,
                    round_timeout_s: float | None = None, wait_s: float = 120.0):
    """A `ServerApp` that runs `run_federation` over Flower messages.

    Args:
        method, splits, model, seed, device: as for `run_federation`.
        num_clients: the nodes to wait for (at most `wait_s` seconds) and address.
        results: the finished `FederationHistory` is appended here (under the simulation
            engine the ServerApp runs in a thread of this process).
        stop: when set, the ServerApp stops waiting for replies and ends with an error.
        round_timeout_s: the longest wait for a round's replies (None: no limit); nodes
            that have not answered by then are left out of the round with a warning.
    """
    from flwr.app import Message, MessageType
    from flwr.serverapp import ServerApp

    app = ServerApp()
    stop = stop or threading.Event()

    def stopped() -> None:
        if stop.is_set():
            raise DDSuiteError("the Flower simulation stopped while the server was waiting")

    @app.main()
    def main(grid, context) -> None:
        deadline = time.monotonic() + wait_s
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < num_clients:
            stopped()
            if time.monotonic() > deadline:
                raise DDSuiteError(f"only {len(node_ids)} of {num_clients} Flower nodes "
                                   f"connected within {wait_s:.0f} s")
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())

        def exchange(round_: int, state: dict[str, Tensor] | None) -> list:
            messages = [Message(content=encode_instruction(round_, state), dst_node_id=node,
                                message_type=MessageType.TRAIN) for node in node_ids]
            pending = set(grid.push_messages(messages))
            limit = None if round_timeout_s is None else time.monotonic() + round_timeout_s
            answers = []
            while pending:
                stopped()
                if limit is not None and time.monotonic() > limit:
                    logger.warning("round %d: %d node(s) did not answer within %.0f s; the "
                                   "round carries on without them", round_, len(pending),
                                   round_timeout_s)
                    break
                pulled = list(grid.pull_messages(pending))
                answers += pulled
                pending -= {m.metadata.reply_to_message_id for m in pulled}
                if pending:
                    time.sleep(0.05)
            replies = []
            for answer in answers:
                if answer.has_error():
                    logger.warning("round %d: node %s failed (%s); the round carries on "
                                   "without it", round_, answer.metadata.src_node_id,
                                   answer.error.reason)
                    continue
                replies.append(decode_reply(answer.content))
            return sorted(replies, key=lambda r: r.client)

        results.append(run_federation(method, exchange=exchange, splits=splits, model=model,
                                      seed=seed, device=device, num_clients=len(node_ids)))

    return app


def ray_backend_config(*, cpus_per_client: float = 1.0, gpus_per_client: float = 0.0,
                       num_cpus: int | None = None, object_store_mb: int = 128
                       ) -> dict[str, Any]:
    """A small Ray backend: `cpus_per_client` (and `gpus_per_client`) per virtual client, a
    capped object store (Ray's minimum is 75 MiB), no dashboard."""
    init_args: dict[str, Any] = {"object_store_memory": object_store_mb * 2**20,
                                 "include_dashboard": False}
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
            "init_args": init_args}


def run_on_flower(method: FederatedMethod, *, splits, load_client: Callable[[int], ClientData],
                  num_clients: int, model: str, seed: int, device: torch.device | str = "cpu",
                  backend_config: dict[str, Any] | None = None,
                  round_timeout_s: float | None = None) -> FederationHistory:
    """Run `method` on Flower's Ray-backed simulation with `num_clients` virtual nodes.

    `backend_config` defaults to `ray_backend_config(num_cpus=1)`: one CPU for Ray, one per
    client, so virtual clients run one after another (raise `num_cpus` to run them in
    parallel); on CUDA each client also reserves the GPU. `round_timeout_s` bounds the wait
    for a round's replies.

    Raises:
        ConfigError: when Flower or Ray is not installed.
        DDSuiteError: when the simulation ends without a result (Ray failed to start, or
            the ServerApp never ran); Flower's log above says why.
    """
    try:
        from flwr.simulation import run_simulation
    except ImportError:
        raise ConfigError(["the Flower engine needs Flower with its simulation extra: "
                           "pip install 'ddsuite[federated]' (flwr[simulation])"]) from None
    try:
        import ray
    except ImportError:
        raise ConfigError(["Flower's simulation engine needs Ray: pip install "
                           "'flwr[simulation]'"]) from None
    device = torch.device(device)
    results: list[FederationHistory] = []
    stop = threading.Event()
    server = make_server_app(method, splits=splits, model=model, seed=seed, device=device,
                             num_clients=num_clients, results=results, stop=stop,
                             round_timeout_s=round_timeout_s)
    client = make_client_app(method, load_client, model=model, seed=seed, device=str(device))
    # Ray hides GPUs from workers that reserve none: on CUDA each client reserves the GPU.
    config = backend_config or ray_backend_config(
        num_cpus=1, gpus_per_client=1.0 if device.type == "cuda" else 0.0)
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=num_clients,
                       backend_name="ray", backend_config=config)
    except SystemExit as exc:  # flwr_exit() on a failed start
        raise DDSuiteError(f"Flower's simulation engine stopped (exit code {exc.code}) before "
                           "the federation finished; its log above says why (Ray may have "
                           "failed to start)") from None
    except RuntimeError as exc:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DDSuiteError(f"Flower's simulation engine failed ({type(cause).__name__}: "
                           f"{cause}); Ray may have failed to start: check backend_config "
                           f"{config}") from exc
    finally:
        stop.set()  # a ServerApp still waiting for replies gives up
        if ray.is_initialized():
            ray.shutdown()
    if not results:
        raise DDSuiteError("Flower's simulation ended without a result: the ServerApp did not "
                           "finish (Ray may have failed to start; see Flower's log above)")
    return results[0]
