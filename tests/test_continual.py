"""Continual learning on Avalanche: benchmarks, the condensed memory, plugins, the harness."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("avalanche")

from avalanche.training.plugins import SupervisedPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from ddsuite.applications.continual import (  # noqa: E402
    CondensationCache,
    CondensedBuffer,
    RetrainOnMemoryPlugin,
    distilled_replay,
    make_benchmark,
)
from ddsuite.applications.continual.benchmark import tensor_dataset  # noqa: E402
from ddsuite.core.errors import ConfigError, IPCError, UnknownNameError  # noqa: E402
from ddsuite.core.models import build_model  # noqa: E402
from ddsuite.scenarios import load_scenario  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
CHEAP_DM = {"iterations": 5, "model": "convnet(width=8)", "batch_real": 16}


@pytest.fixture(scope="module")
def split_digits(digits_splits):
    return make_benchmark(digits_splits, kind="split", n_experiences=5, seed=0)


def _rows_in(candidates: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """For each candidate image, whether it equals some image of `pool`."""
    distances = torch.cdist(candidates.flatten(1), pool.flatten(1))
    return distances.min(dim=1).values < 1e-6


# -- benchmarks ------------------------------------------------------------------------------

def test_split_deals_every_class_once_in_a_seeded_order(digits_splits, split_digits):
    classes = split_digits.classes_per_experience
    assert sorted(c for exp in classes for c in exp) == list(range(10))
    for exp, expected in zip(split_digits.benchmark.train_stream, classes):
        assert sorted(set(exp.dataset.targets)) == expected
    for exp, expected in zip(split_digits.benchmark.test_stream, classes):
        assert sorted(set(exp.dataset.targets)) == expected
    again = make_benchmark(digits_splits, kind="split", n_experiences=5, seed=0)
    other = make_benchmark(digits_splits, kind="split", n_experiences=5, seed=1)
    assert again.class_order == split_digits.class_order
    assert other.class_order != split_digits.class_order
    numpy_seed = make_benchmark(digits_splits, kind="split", n_experiences=5, seed=np.int64(0))
    assert numpy_seed.class_order == split_digits.class_order
    assert type(numpy_seed.to_dict()["seed"]) is int  # JSON-ready provenance
    assert split_digits.to_dict()["dataset"]["fingerprint"] == \
        digits_splits.identity.fingerprint


def test_permuted_streams_keep_all_classes_and_permute_pixels(digits_splits):
    bench = make_benchmark(digits_splits, kind="permuted", n_experiences=3, seed=0)
    original_mean = digits_splits.train.images.mean(dim=0).flatten()
    means = []
    for exp in bench.benchmark.train_stream:
        assert sorted(set(exp.dataset.targets)) == list(range(10))
        loader = torch.utils.data.DataLoader(exp.dataset, batch_size=2000)
        images = next(iter(loader))[0]
        assert images.shape == digits_splits.train.images.shape
        means.append(images.mean(dim=0).flatten())
    for mean in means:
        # The mean image of a permuted experience is the permuted mean image.
        assert torch.allclose(mean.sort().values, original_mean.sort().values, atol=1e-5)
    assert not torch.allclose(means[0], means[1])


def test_benchmark_refuses_what_it_cannot_build(digits_splits):
    with pytest.raises(ConfigError) as info:
        make_benchmark(digits_splits, kind="split", n_experiences=3)
    assert "1, 2, 5, 10" in str(info.value)
    with pytest.raises(ConfigError, match="'rotated' is not one of split, permuted"):
        make_benchmark(digits_splits, kind="rotated")


# -- the condensed memory --------------------------------------------------------------------

def test_fixed_share_memory_holds_condensed_images_with_original_labels(split_digits):
    memory = CondensedBuffer(30, method="dm", method_config=CHEAP_DM, total_num_groups=10)
    seen: list[int] = []
    for k, exp in enumerate(split_digits.benchmark.train_stream):
        memory.post_adapt(None, exp)
        seen += split_digits.classes_per_experience[k]
        assert len(memory) == len(memory.buffer) == 3 * len(seen)
        assert sorted(set(memory.buffer.targets)) == sorted(seen)
        assert set(memory.buffer.targets_task_labels) == {0}
    images, labels = memory.tensors()
    assert images.shape == (30, 1, 8, 8)
    assert torch.bincount(labels, minlength=10).tolist() == [3] * 10
    assert memory.memory_bytes == images.numel() * 4 + labels.numel() * 8
    assert torch.isfinite(images).all()
    # DM moved the images away from the real ones it started from.
    assert not _rows_in(images, split_digits.splits.train.images).all()
    assert len(memory.condense_seconds) == 5


def test_adaptive_share_subsamples_older_groups(split_digits):
    memory = CondensedBuffer(20, method="random")
    stream = split_digits.benchmark.train_stream
    memory.post_adapt(None, stream[0])
    first_class = split_digits.classes_per_experience[0][0]
    before = memory.groups[(0, first_class)].images.clone()
    assert before.shape[0] == 10
    memory.post_adapt(None, stream[1])
    after = memory.groups[(0, first_class)].images
    assert after.shape[0] == 5 and len(memory) == 20
    assert _rows_in(after, before).all()
    memory.resize(None, 8)
    assert len(memory) == 8 and memory.max_size == 8
    with pytest.raises(ConfigError, match="cannot hold one image for each of the 4 groups"):
        memory.resize(None, 3)


def test_memory_errors_name_the_problem(split_digits, digits_splits):
    stream = split_digits.benchmark.train_stream
    with pytest.raises(UnknownNameError, match="allowed: .*dm"):
        CondensedBuffer(10, method="no-such-method")
    with pytest.raises(ConfigError, match="must not set ipc"):
        CondensedBuffer(10, method="dm", method_config={"ipc": 3})
    with pytest.raises(ConfigError, match="max_size 5 cannot hold one image for each of the 10"):
        CondensedBuffer(5, method="random", total_num_groups=10)
    small = CondensedBuffer(3, method="random")
    small.post_adapt(None, stream[0])
    with pytest.raises(ConfigError, match="cannot hold one image for each of the 4 groups"):
        small.post_adapt(None, stream[1])
    greedy = CondensedBuffer(1000, method="random", total_num_groups=2)
    with pytest.raises(IPCError, match="fewer images than the memory share of 500"):
        greedy.post_adapt(None, stream[0])

    class Experience:
        current_experience = 0
        dataset = tensor_dataset(digits_splits.train.images[:40],
                                 digits_splits.train.labels[:40], task_label=3)

    with pytest.raises(ConfigError, match=r"task labels \[3\].*task-free"):
        CondensedBuffer(10, method="random").post_adapt(None, Experience())
    for memory in (small, greedy):  # a failed update never leaves a half-written memory
        assert len(memory.buffer) == len(memory)


def test_cache_condenses_each_experience_once(split_digits, monkeypatch):
    from ddsuite.applications.continual import memory as memory_module

    calls = []
    real_distill = memory_module.distill

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real_distill(*args, **kwargs)

    monkeypatch.setattr(memory_module, "distill", counting)
    cache = CondensationCache()
    first = CondensedBuffer(10, method="dm", method_config=CHEAP_DM, total_num_groups=10,
                            cache=cache)
    second = CondensedBuffer(10, method="dm", method_config=CHEAP_DM, total_num_groups=10,
                             cache=cache)
    exp = split_digits.benchmark.train_stream[0]
    first.post_adapt(None, exp)
    second.post_adapt(None, exp)
    assert calls == [0]
    assert torch.equal(first.tensors()[0], second.tensors()[0])
    other_seed = CondensedBuffer(10, method="dm", method_config=CHEAP_DM, total_num_groups=10,
                                 cache=cache, seed=1)
    other_seed.post_adapt(None, exp)
    assert calls == [0, 1000]


# -- plugins in an Avalanche strategy --------------------------------------------------------

def _naive(plugin, *, epochs=1, extra=()):
    torch.manual_seed(0)
    model = build_model("convnet(width=8)", in_channels=1, num_classes=10, image_size=(8, 8),
                        device="cpu")
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                 train_mb_size=32, train_epochs=epochs, device="cpu", plugins=[plugin, *extra],
                 evaluator=None)


class SeenSizes(SupervisedPlugin):
    """Records how many samples each experience's training ran over."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def before_training_epoch(self, strategy, **kwargs):
        self.sizes.append(len(strategy.adapted_dataset))


def test_retrain_on_memory_trains_only_on_the_memory(split_digits):
    memory = CondensedBuffer(20, method="random", total_num_groups=10)
    plugin = RetrainOnMemoryPlugin(memory)
    seen = SeenSizes()
    strategy = _naive(plugin, extra=[seen])
    for exp in split_digits.benchmark.train_stream[:3]:
        strategy.train(exp)
    assert seen.sizes == [4, 8, 12]
    # Every experience starts again from the weights the first one began with.
    initial = next(_naive(RetrainOnMemoryPlugin(memory)).model.parameters())
    assert torch.equal(next(plugin.init_model.parameters()), initial)
    assert not torch.equal(next(strategy.model.parameters()), initial)


class SeenLabels(SupervisedPlugin):
    """Records the labels of every training minibatch, per experience."""

    def __init__(self):
        super().__init__()
        self.labels: list[set[int]] = []

    def before_training_exp(self, strategy, **kwargs):
        self.labels.append(set())

    def before_forward(self, strategy, **kwargs):
        self.labels[-1].update(strategy.mb_y.tolist())


def test_distilled_replay_mixes_the_memory_into_later_experiences(split_digits):
    plugin = distilled_replay(20, method="dm", method_config=CHEAP_DM, total_num_groups=10)
    seen = SeenLabels()
    strategy = _naive(plugin, extra=[seen])
    stream = split_digits.benchmark.train_stream
    first, second = split_digits.classes_per_experience[:2]
    strategy.train(stream[0])
    assert len(plugin.storage_policy.buffer) == 4
    strategy.train(stream[1])
    assert len(plugin.storage_policy.buffer) == 8
    assert seen.labels[0] == set(first)
    assert seen.labels[1] == set(first) | set(second)  # replayed memory of experience 0


def test_readme_example_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- continual-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README's Avalanche example is missing"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102
    # Without replay only the last experience (2 of 10 classes) would be right, about 0.2.
    assert namespace["accuracy"] > 0.4


# -- the harness -----------------------------------------------------------------------------

FAST = ["policies.3.iterations=20", "learner.epochs=1"]


def test_split_digits_scenario_writes_its_report(tmp_path):
    loaded = load_scenario("split-digits", FAST)
    summary = loaded.kind.run(loaded.config, out_dir=tmp_path / "run", device="cpu",
                              resolved=loaded.resolved)
    run = tmp_path / "run"
    for name in ("summary.md", "metrics.json", "scenario.yaml",
                 "plots/accuracy_per_experience.png", "plots/accuracy_matrix.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["results"]) == {"reservoir", "random", "herding", "dm"}
    assert metrics["versions"]["avalanche-lib"] == "0.6.0"
    assert metrics["budget"] == {"ipc": 5, "images": 50}
    for policy, by_protocol in metrics["results"].items():
        for protocol in ("replay", "retrain"):
            result = by_protocol[protocol]
            (single,) = result["runs"]
            matrix = single["accuracy_matrix"]
            assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
            assert single["final_average_accuracy"] == pytest.approx(sum(matrix[-1]) / 5)
            assert single["memory_images"] == 50
            assert single["memory_bytes"] == 50 * (64 * 4 + 8)
            assert 0 <= single["final_average_accuracy"] <= 1
    retrain = [metrics["results"][p]["retrain"]["final_average_accuracy"]["mean"]
               for p in ("random", "herding", "dm")]
    assert min(retrain) > 0.3  # memories of every class beat chance (0.1) by far
    # Avalanche's forgetting agrees with the accuracy matrix the harness parsed: accuracy on
    # each earlier experience right after learning it, minus its final accuracy.
    for by_protocol in metrics["results"].values():
        for result in by_protocol.values():
            m = result["runs"][0]["accuracy_matrix"]
            drops = [m[j][j] - m[-1][j] for j in range(4)]
            assert result["runs"][0]["forgetting"] == pytest.approx(sum(drops) / 4, abs=1e-6)
    assert "| retrain  | dm" in summary


def test_continual_scenario_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        load_scenario("split-digits", ["policies.0.name=nope", "protocols=[replay, online]",
                                       "ipc=0", "policies.1.iterations=5",
                                       "benchmark.kind=rotated"])
    text = str(info.value)
    for expected in ("'nope' is not a policy", "protocols", "ipc", "random",
                     "'rotated' is not one of split, permuted"):
        assert expected in text, expected


def test_permuted_scenario_needs_an_equal_share_for_each_experience():
    for ipc in (2, 7):
        with pytest.raises(ConfigError, match="ipc must be a multiple of n_experiences"):
            load_scenario("split-digits", ["benchmark.kind=permuted", f"ipc={ipc}",
                                           "benchmark.n_experiences=3"])
    load_scenario("split-digits", ["benchmark.kind=permuted", "ipc=6",
                                   "benchmark.n_experiences=3"])


def test_task_aware_memory_keeps_each_experience_task_label(digits_splits):
    from avalanche.benchmarks import nc_benchmark

    train, test = digits_splits.train, digits_splits.test
    bench = nc_benchmark(tensor_dataset(train.images, train.labels),
                         tensor_dataset(test.images, test.labels), n_experiences=5,
                         task_labels=True, seed=0)
    memory = CondensedBuffer(30, method="random", total_num_groups=10, task_free=False)
    for exp in bench.train_stream[:3]:
        memory.post_adapt(None, exp)
    assert sorted(set(memory.buffer.targets_task_labels)) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"task labels \[1\].*task-free"):
        CondensedBuffer(30, method="random", total_num_groups=10).post_adapt(
            None, bench.train_stream[1])


def test_memory_refuses_what_it_cannot_store_honestly():
    with pytest.raises(ConfigError) as info:
        CondensedBuffer(10, method="idm", seed="x", device="gpu")
    text = str(info.value)
    assert "factor=2" in text and "seed must be an integer" in text and "gpu" in text
    with pytest.raises(ConfigError, match="soft or learnable labels"):
        CondensedBuffer(10, method="tesla", method_config={"soft_labels": True})


def test_sparse_labels_are_kept_without_a_table_of_the_largest(digits_splits):
    images = digits_splits.train.images[:60]
    labels = torch.tensor([7, 2 ** 40] * 30)

    class Experience:
        current_experience = 0
        dataset = tensor_dataset(images, labels)

    memory = CondensedBuffer(4, method="random")
    memory.post_adapt(None, Experience())
    assert sorted(set(memory.buffer.targets)) == [7, 2 ** 40]


def test_duplicate_policies_protocols_and_seeds_are_refused():
    with pytest.raises(ConfigError) as info:
        load_scenario("split-digits", ["policies.1.name=reservoir", "protocols=[retrain, retrain]",
                                       "seeds=[0, 0]"])
    text = str(info.value)
    assert "reservoir appear(s) more than once" in text
    assert "protocols: each value may appear once" in text and "seeds: each value" in text
    labelled = load_scenario("split-digits", ["policies.1.name=reservoir",
                                              "policies.1.label=reservoir-2"])
    assert labelled.config.policies[1]["label"] == "reservoir-2"


def test_a_bad_policy_fails_before_the_report_folder_and_a_failed_run_can_be_replaced(tmp_path):
    late = load_scenario("split-digits", ["policies.3.factor=3", "policies.3.name=idm"])
    with pytest.raises(ConfigError):
        late.kind.run(late.config, out_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    wide = load_scenario("split-digits", ["distill_model=convnet(width=999999999)"])
    with pytest.raises(ConfigError, match="distill_model"):
        wide.kind.run(wide.config, out_dir=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()

    from ddsuite.applications.continual import harness

    loaded = load_scenario("split-digits", ["policies=[{name: reservoir}]", "protocols=[retrain]",
                                            "learner.retrain_epochs=1"])
    original = harness.run_stream

    def broken(*args, **kwargs):
        raise RuntimeError("the learner crashed")

    harness.run_stream = broken
    try:
        with pytest.raises(RuntimeError):
            loaded.kind.run(loaded.config, out_dir=tmp_path / "run", device="cpu")
    finally:
        harness.run_stream = original
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed" and "the learner crashed" in status["error"]
    loaded.kind.run(loaded.config, out_dir=tmp_path / "run", device="cpu", overwrite=True)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_labels_and_seeds_are_checked(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_scenario("split-digits", ["policies.1.label=gdumb", "policies.2.label=a|b",
                                       "seeds=[100000000000000000]"])
    text = str(info.value)
    assert "'gdumb' is the name of another policy" in text
    assert "without '|'" in text and "seeds: expected a non-empty list of integers in" in text


def test_a_live_report_cannot_be_overwritten(tmp_path):
    from ddsuite.core.engine import prepare_out_dir, scenario_status

    out = tmp_path / "run"
    out.mkdir()
    with scenario_status(out, "live"):
        with pytest.raises(ConfigError, match="in use by another ddsuite process"):
            prepare_out_dir(out, resume=False, overwrite=True)
    prepare_out_dir(out, resume=False, overwrite=True)
    assert not out.exists() or not any(out.iterdir())
