"""Federated learning: partitions, payloads and bytes, server checks, both engines, harness."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from ddsuite.applications.federated import (
    FederatedMethod,
    InProcessExchange,
    ModelUpdate,
    Payload,
    TrainSpec,
    client_data,
    client_step,
    partition_labels,
    payload_problems,
    run_federation,
    tensor_bytes,
)
from ddsuite.applications.federated.client import global_model
from ddsuite.core.errors import ConfigError, DDSuiteError
from ddsuite.scenarios import load_scenario

README = Path(__file__).resolve().parents[1] / "README.md"
MODEL = "convnet(width=16)"
CHEAP_DM = {"iterations": 10, "batch_real": 16}
SERVER = TrainSpec(epochs=60, lr=0.01, batch_size=64)


@pytest.fixture(scope="module")
def federation(digits_splits):
    """Digits shared among 3 clients at Dirichlet alpha 0.5."""
    part = partition_labels(digits_splits.train.labels, num_clients=3, alpha=0.5, seed=0)
    clients = [client_data(digits_splits, idx, client=k) for k, idx in enumerate(part.indices)]
    return digits_splits, part, clients


def _run(method, splits, clients, exchange=None):
    exchange = exchange or InProcessExchange(method, clients, model=MODEL, seed=0, device="cpu")
    return run_federation(method, exchange=exchange, splits=splits, model=MODEL, seed=0,
                          device="cpu", num_clients=len(clients))


# -- partitions ------------------------------------------------------------------------------

def test_partitions_are_seeded_disjoint_and_complete(digits_splits):
    labels = digits_splits.train.labels
    for scheme in ("dirichlet", "iid", "shards"):
        a = partition_labels(labels, num_clients=7, scheme=scheme, alpha=0.3, seed=1)
        b = partition_labels(labels, num_clients=7, scheme=scheme, alpha=0.3, seed=1)
        c = partition_labels(labels, num_clients=7, scheme=scheme, alpha=0.3, seed=2)
        assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
        assert any(not torch.equal(x, y) for x, y in zip(a.indices, c.indices))
        everything = torch.cat(a.indices).sort().values
        assert torch.equal(everything, torch.arange(len(labels)))  # disjoint and complete
        assert min(a.sizes) >= 10
        assert a.histograms.sum().item() == len(labels)
        for k, idx in enumerate(a.indices):
            assert torch.equal(a.histograms[k], torch.bincount(labels[idx], minlength=10))


def test_smaller_alpha_gives_stronger_label_skew(digits_splits):
    labels = digits_splits.train.labels

    def skew(**kwargs):
        return sum(partition_labels(labels, num_clients=10, seed=s, min_size=5, **kwargs)
                   .label_skew() for s in range(5)) / 5

    strong, medium, weak = (skew(alpha=a) for a in (0.1, 1.0, 100.0))
    iid = skew(scheme="iid")
    assert strong > medium > weak
    assert strong > 0.6 and weak < 0.15 and iid < 0.15
    shards = partition_labels(labels, num_clients=10, scheme="shards", shards_per_client=2,
                              seed=0)
    # Two label-sorted shards span at most four classes.
    assert max(int((h > 0).sum()) for h in shards.histograms) <= 4


def test_min_size_is_met_by_redrawing(digits_splits):
    labels = digits_splits.train.labels
    part = partition_labels(labels, num_clients=10, alpha=0.1, min_size=60, seed=0)
    assert min(part.sizes) >= 60
    assert part.redraws > 0  # alpha 0.1 rarely gives ten clients 60 samples at once


@pytest.mark.parametrize("kwargs, words", [
    ({"alpha": 0.0}, ["alpha", "> 0", "0.0"]),
    ({"alpha": -1.0}, ["alpha", "> 0", "-1.0"]),
    ({"num_clients": 5000, "min_size": 1}, ["num_clients", "5000", "at most"]),
    ({"num_clients": 0}, ["num_clients", ">= 1"]),
    ({"min_size": 0}, ["min_size", "every client needs data"]),
    ({"scheme": "shards", "num_clients": 1000, "shards_per_client": 2, "min_size": 1},
     ["shards_per_client", "without data"]),
    ({"alpha": 0.01, "min_size": 120, "max_redraws": 5}, ["min_size 120", "raise alpha"]),
    ({"scheme": "round-robin"}, ["scheme", "dirichlet, iid, shards"]),
])
def test_bad_partition_settings_are_named(digits_splits, kwargs, words):
    args = {"num_clients": 10, "alpha": 0.5, "min_size": 10, "seed": 0, **kwargs}
    with pytest.raises(ConfigError) as info:
        partition_labels(digits_splits.train.labels, **args)
    for word in words:
        assert word in str(info.value)


# -- payloads and bytes ----------------------------------------------------------------------

def test_distilled_payload_is_counted_exactly_and_labelled_globally(federation):
    splits, part, clients = federation
    method = FederatedMethod(kind="oneshot", ipc=4, distill=CHEAP_DM, server=SERVER)
    payloads = [client_step(method, c, round_=1, model=MODEL, global_state=None, seed=0,
                            device="cpu") for c in clients]
    for payload, counts in zip(payloads, part.histograms):
        kept = [c for c, n in enumerate(counts.tolist()) if n >= 4]
        assert payload.labels_syn.tolist() == [c for c in kept for _ in range(4)]
        assert payload.images_syn.shape == (4 * len(kept), 1, 8, 8)
        expected = payload.images_syn.numel() * 4 + payload.labels_syn.numel() * 8
        assert payload.num_bytes == expected
        assert payload.info["skipped"] == [c for c, n in enumerate(counts.tolist())
                                           if 0 < n < 4]
    history = _run(method, splits, clients)
    assert history.bytes_up == sum(p.numel() * p.element_size() for pl in payloads
                                   for p in pl.tensors().values())
    assert history.bytes_down == 0
    assert history.final_accuracy > 0.5  # far above the 10% of chance


def test_fedavg_bytes_are_model_sizes_up_and_down(federation):
    splits, _, clients = federation
    method = FederatedMethod(kind="fedprox", rounds=2, mu=0.1,
                             local=TrainSpec(epochs=1, lr=0.01, batch_size=32))
    history = _run(method, splits, clients)
    net = global_model(MODEL, splits, device="cpu", seed=0)
    model_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    assert history.bytes_up == history.bytes_down == 2 * 3 * model_bytes
    assert history.final_accuracy > history.initial_accuracy


def test_centralised_uploads_every_sample_once(federation):
    splits, _, clients = federation
    method = FederatedMethod(kind="centralised", server=TrainSpec(epochs=10, batch_size=64))
    history = _run(method, splits, clients)
    n = len(splits.train)
    assert history.bytes_up == n * 64 * 4 + n * 8
    assert history.final_accuracy > 0.8


# -- the server's checks ---------------------------------------------------------------------

class Corrupting:
    """An exchange that damages some clients' replies."""

    def __init__(self, inner, damage):
        self.inner, self.damage = inner, damage

    def __call__(self, round_, state):
        replies = self.inner(round_, state)
        return [self.damage[r.client](r) if r.client in self.damage else r for r in replies]


def _nan_images(p: Payload) -> Payload:
    images = p.images_syn.clone()
    images[0, 0, 0, 0] = float("nan")
    return Payload(client=p.client, images_syn=images, labels_syn=p.labels_syn)


def _wrong_shape(p: Payload) -> Payload:
    return Payload(client=p.client, images_syn=p.images_syn[:, :, :4], labels_syn=p.labels_syn)


def _wrong_classes(p: Payload) -> Payload:
    return Payload(client=p.client, images_syn=p.images_syn, labels_syn=p.labels_syn + 10)


def test_bad_payloads_are_rejected_by_client_and_the_round_carries_on(federation, caplog):
    splits, _, clients = federation
    method = FederatedMethod(kind="oneshot", ipc=4, distill=CHEAP_DM, server=SERVER)
    inner = InProcessExchange(method, clients, model=MODEL, seed=0, device="cpu")
    exchange = Corrupting(inner, {1: _nan_images, 2: _wrong_shape})
    with caplog.at_level(logging.WARNING, logger="ddsuite.applications.federated"):
        history = _run(method, splits, clients, exchange)
    record = history.rounds[0]
    assert record.accepted == [0]
    assert set(record.rejected) == {1, 2}
    assert "non-finite" in record.rejected[1][0]
    assert "shape" in record.rejected[2][0]
    assert re.search(r"rejected the reply of client 1 .*non-finite", caplog.text)
    assert re.search(r"rejected the reply of client 2 .*shape", caplog.text)
    assert all(torch.isfinite(t).all() for t in history.state.values())
    assert history.final_accuracy > history.initial_accuracy  # trained on client 0's set
    assert record.missing == []


def test_a_client_that_sends_nothing_is_recorded_as_missing(federation, caplog):
    splits, _, clients = federation
    method = FederatedMethod(kind="oneshot", ipc=4, distill=CHEAP_DM, server=SERVER)
    inner = InProcessExchange(method, clients, model=MODEL, seed=0, device="cpu")

    def drop_client_1(round_, state):
        return [r for r in inner(round_, state) if r.client != 1]

    with caplog.at_level(logging.WARNING, logger="ddsuite.applications.federated"):
        history = _run(method, splits, clients, drop_client_1)
    assert history.rounds[0].missing == [1]
    assert history.rounds[0].accepted == [0, 2]
    assert "no reply from client(s) [1]" in caplog.text
    assert history.to_dict()["rounds"][0]["missing"] == [1]


def test_a_round_with_nothing_usable_keeps_the_global_model(federation, caplog):
    splits, _, clients = federation
    method = FederatedMethod(kind="fedavg", rounds=1, local=TrainSpec(epochs=1))

    def poisoned(u: ModelUpdate) -> ModelUpdate:
        return ModelUpdate(client=u.client, num_examples=u.num_examples,
                           state={k: torch.full_like(v, float("inf")) for k, v in
                                  u.state.items()})

    inner = InProcessExchange(method, clients, model=MODEL, seed=0, device="cpu")
    with caplog.at_level(logging.WARNING, logger="ddsuite.applications.federated"):
        history = _run(method, splits, clients, Corrupting(inner, dict.fromkeys(range(3),
                                                                               poisoned)))
    initial = global_model(MODEL, splits, device="cpu", seed=0).state_dict()
    assert all(torch.equal(history.state[k], v) for k, v in initial.items())
    assert history.final_accuracy == history.initial_accuracy
    assert "no usable reply" in caplog.text


def test_payload_checks_name_class_count_and_soft_labels():
    images = torch.zeros(4, 1, 8, 8)
    good = Payload(client=0, images_syn=images, labels_syn=torch.tensor([0, 1, 2, 9]))
    assert payload_problems(good, image_shape=(1, 8, 8), num_classes=10) == []
    bad = _wrong_classes(good)
    assert "outside the 10 classes" in payload_problems(bad, image_shape=(1, 8, 8),
                                                        num_classes=10)[0]
    soft = Payload(client=0, images_syn=images, labels_syn=good.labels_syn,
                   labels_soft=torch.zeros(4, 7))
    assert "labels_soft has shape (4, 7)" in payload_problems(
        soft, image_shape=(1, 8, 8), num_classes=10)[0]
    assert good.num_bytes == tensor_bytes(good.tensors()) == 4 * 64 * 4 + 4 * 8


def test_payloads_of_the_wrong_dtype_are_rejected_not_trained_on(federation):
    """A node sending float64 images or int32 labels would crash the server's training."""
    splits, _, clients = federation
    method = FederatedMethod(kind="oneshot", ipc=4, distill=CHEAP_DM, server=SERVER)
    inner = InProcessExchange(method, clients, model=MODEL, seed=0, device="cpu")

    def doubled(p: Payload) -> Payload:
        return Payload(client=p.client, images_syn=p.images_syn.double(),
                       labels_syn=p.labels_syn)

    def int32_labels(p: Payload) -> Payload:
        return Payload(client=p.client, images_syn=p.images_syn,
                       labels_syn=p.labels_syn.int())

    history = _run(method, splits, clients, Corrupting(inner, {1: doubled, 2: int32_labels}))
    record = history.rounds[0]
    assert record.accepted == [0]
    assert "float32" in record.rejected[1][0] and "int64" in record.rejected[2][0]


# -- both engines ----------------------------------------------------------------------------

def test_flower_simulation_matches_the_in_process_run(federation):
    pytest.importorskip("ray")
    from ddsuite.applications.federated import run_on_flower
    from ddsuite.applications.federated.harness import PartitionSpec, ShardLoader
    from ddsuite.scenarios.compare import DatasetSpec

    splits, part, clients = federation
    loader = ShardLoader(DatasetSpec(name="digits"), num_clients=3,
                         partition=PartitionSpec(alphas=[0.5]), alpha=0.5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(loader.load()[1].indices, part.indices))
    method = FederatedMethod(kind="multiround", rounds=2, ipc=4, distill=CHEAP_DM,
                             server=SERVER)
    local = _run(method, splits, clients)
    flower = run_on_flower(method, splits=splits, load_client=loader, num_clients=3,
                           model=MODEL, seed=0)
    assert [r.accuracy for r in flower.rounds] == [r.accuracy for r in local.rounds]
    assert (flower.bytes_up, flower.bytes_down) == (local.bytes_up, local.bytes_down)
    state_bytes = tensor_bytes(local.state)
    assert local.bytes_down == 2 * 3 * state_bytes
    assert all(torch.equal(flower.state[k], v) for k, v in local.state.items())


def test_ray_failing_to_start_is_a_clear_error(federation):
    pytest.importorskip("ray")
    from ddsuite.applications.federated import run_on_flower
    from ddsuite.applications.federated.flower import ray_backend_config

    splits, _, clients = federation
    config = ray_backend_config(num_cpus=1)
    config["init_args"]["object_store_memory"] = 1  # below Ray's minimum: Ray refuses
    with pytest.raises(DDSuiteError, match="Ray may have failed to start"):
        run_on_flower(FederatedMethod(kind="centralised"), splits=splits,
                      load_client=clients.__getitem__, num_clients=3, model=MODEL, seed=0,
                      backend_config=config)


# -- the harness -----------------------------------------------------------------------------

def test_scenario_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load_scenario("federated-digits", ["partition.alphas=[0, 0.5]", "methods.0.kind=nope",
                                           "num_clients=0", "methods.2.local.lr=-1",
                                           "engine=grpc"])
    text = str(info.value)
    for expected in ("partition.alphas", "methods[0].kind: 'nope'", "num_clients",
                     "methods[2].local.lr", "engine: 'grpc'"):
        assert expected in text


def test_scenario_refuses_a_partition_it_cannot_draw_before_writing(tmp_path):
    loaded = load_scenario("federated-digits", ["num_clients=5000"])
    out = tmp_path / "report"
    with pytest.raises(ConfigError, match="num_clients"):
        loaded.kind.run(loaded.config, out_dir=out, device="cpu", resolved=loaded.resolved)
    assert not out.exists()


def test_digits_scenario_writes_the_report(tmp_path):
    methods = ("[{kind: oneshot, ipc: 4, distill: {iterations: 10, batch_real: 16}, "
               "server: {epochs: 30}}, {kind: fedavg, rounds: 3}, "
               "{kind: centralised, server: {epochs: 3}}]")
    loaded = load_scenario("federated-digits", ["num_clients=3", "partition.alphas=[0.1, 1.0]",
                                                f"methods={methods}", f"model={MODEL}"])
    out = tmp_path / "report"
    summary = loaded.kind.run(loaded.config, out_dir=out, device="cpu",
                              resolved=loaded.resolved)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"alpha=0.1", "alpha=1"}
    assert metrics["versions"]["flwr"] != "not installed"
    assert metrics["dataset"]["name"] == "digits"
    for setting, by_method in metrics["results"].items():
        assert set(by_method) == {"oneshot", "fedavg", "centralised"}
        fedavg = by_method["fedavg"]
        assert len(fedavg["accuracy_per_round"]) == 3
        assert fedavg["cumulative_bytes"][-1] == fedavg["total_bytes"]["mean"]
        assert by_method["oneshot"]["bytes_down"]["mean"] == 0
    assert metrics["partitions"]["alpha=0.1"][0]["label_skew"] > \
        metrics["partitions"]["alpha=1"][0]["label_skew"]
    for name in ("accuracy_vs_bytes", "accuracy_vs_rounds", "client_histograms"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "| alpha=0.1 | oneshot" in summary
    assert "of fedavg's accuracy" in summary and "of its bytes" in summary
    assert (out / "summary.md").read_text() == summary


def test_scenario_on_flower_matches_in_process(tmp_path):
    pytest.importorskip("ray")
    overrides = ["num_clients=3", "partition.alphas=[0.5]", f"model={MODEL}",
                 "methods=[{kind: fedavg, rounds: 2}]"]
    accuracies = {}
    for engine in ("inprocess", "flower"):
        loaded = load_scenario("federated-digits", overrides + [f"engine={engine}"])
        loaded.kind.run(loaded.config, out_dir=tmp_path / engine, device="cpu",
                        resolved=loaded.resolved)
        metrics = json.loads((tmp_path / engine / "metrics.json").read_text())
        assert metrics["engine"] == engine
        accuracies[engine] = metrics["results"]["alpha=0.5"]["fedavg"]["accuracy_per_round"]
    assert accuracies["flower"] == accuracies["inprocess"]


def test_mnist_scenario_validates():
    loaded = load_scenario("federated-mnist")
    kinds = [m.kind for m in loaded.config.methods]
    assert kinds == ["oneshot", "multiround", "fedavg", "centralised"]
    assert loaded.config.num_clients == 10 and loaded.config.partition.alphas == [0.5]


def test_readme_federated_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text.partition("## Federated learning: distilled uploads on Flower")[2]
    assert section, "the README has no federated section"
    section = section.split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's federated section has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:federated", "exec"), namespace)  # noqa: S102
    history = namespace["history"]
    # One-shot: one round, nothing sent down, every accepted payload's bytes counted up.
    assert len(history.rounds) == 1 and history.bytes_down == 0
    assert history.bytes_up > 0
    assert history.final_accuracy > history.initial_accuracy + 0.2


def test_a_private_distiller_is_refused_until_client_privacy_is_accounted():
    problems = FederatedMethod(kind="multiround", rounds=2, distiller="dp-dm",
                               distill={"epsilon": 1.0}).problems()
    assert any("private distiller" in p and "dp-dm" in p for p in problems)


def test_a_one_shot_upload_of_nothing_is_reported_not_compared():
    from ddsuite.applications.federated.harness import FederatedScenario, _comparison

    scenario = FederatedScenario(name="t", methods=[FederatedMethod(kind="oneshot"),
                                                    FederatedMethod(kind="fedavg", rounds=2)])
    by_method = {
        "oneshot": {"final_accuracy": {"mean": 0.1}, "total_bytes": {"mean": 0.0}},
        "fedavg": {"final_accuracy": {"mean": 0.9}, "total_bytes": {"mean": 1e6},
                   "accuracy_per_round": [0.5, 0.9], "cumulative_bytes": [5e5, 1e6]},
    }
    text = _comparison(scenario, by_method)
    assert "uploaded nothing" in text
    assert "of fedavg's accuracy" not in text
