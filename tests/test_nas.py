"""NAS proxies on NNI: rank correlations, the space, ground-truth cache, divergence, errors."""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ddsuite.applications.nas import (
    FIELD_SPACE,
    ConvNetDims,
    GroundTruthCache,
    TrainingBudget,
    hold_out,
    kendall,
    load_proxy,
    make_proxy,
    measure_ground_truth,
    spearman,
    top_k_spearman,
)
import ddsuite.applications.nas.ground_truth as gt_module
from ddsuite.applications.nas.candidates import check_candidates_fit
from ddsuite.core.errors import ConfigError, InputSpaceMismatchError
from ddsuite.core.models import build_model
from ddsuite.core.synthetic import save_artifact
from ddsuite.scenarios import load_scenario

pytestmark = pytest.mark.usefixtures("torch_single_thread")

README = Path(__file__).resolve().parents[1] / "README.md"

CHEAP_SPACE = ["space.depths=[1]", "space.widths=[8, 16]", "space.norms=[none, instance]",
               "proxies.0.iterations=5", "proxy_budget.epochs=15", "ground_truth.budget.epochs=3"]


# -- rank correlations -----------------------------------------------------------------------

def _brute_spearman(x, y):
    """Pearson correlation of ranks defined as 1 + #smaller + (#equal - 1) / 2."""
    def ranks(v):
        return [1 + sum(u < a for u in v) + (sum(u == a for u in v) - 1) / 2 for a in v]
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


def _brute_kendall(x, y):
    """Tau-b from its definition over every pair."""
    concordant = discordant = tied_x = tied_y = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        tied_x += dx == 0
        tied_y += dy == 0
        if dx * dy > 0:
            concordant += 1
        elif dx * dy < 0:
            discordant += 1
    pairs = len(x) * (len(x) - 1) / 2
    if pairs - tied_x == 0 or pairs - tied_y == 0:
        return None
    return (concordant - discordant) / math.sqrt((pairs - tied_x) * (pairs - tied_y))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=2, max_size=25))
def test_rank_correlations_match_their_definitions_with_ties(pairs):
    x = [float(a) for a, _ in pairs]
    y = [float(b) for _, b in pairs]
    for fast, slow in ((spearman, _brute_spearman), (kendall, _brute_kendall)):
        got, want = fast(x, y), slow(x, y)
        if want is None:
            assert got is None
        else:
            assert got == pytest.approx(want, abs=1e-9)


def test_rank_correlations_known_values_and_undefined_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None and kendall([1, 1, 1], [1, 2, 3]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [1, 2, 2, 3, 5, 5, 7], [2, 1, 4, 4, 3, 6, 6]
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
    assert kendall(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)
    with pytest.raises(ValueError, match="finite"):
        spearman([1.0, math.nan], [1.0, 2.0])
    real, proxy = [90, 80, 70, 60, 50, 40], [1, 2, 3, 4, 5, 6]
    assert top_k_spearman(real, proxy, 3) == pytest.approx(-1.0)
    assert top_k_spearman(real, proxy, 10) is None


# -- the search space ------------------------------------------------------------------------

def test_field_space_is_the_720_convnets_and_every_candidate_is_a_ddsuite_spec():
    assert FIELD_SPACE.size == 720 == len(set(FIELD_SPACE.specs()))
    sample = FIELD_SPACE.sample(48, seed=0)
    assert len(set(sample)) == 48 and sample == FIELD_SPACE.sample(48, seed=0)
    check_candidates_fit(sample, image_shape=(1, 28, 28), num_classes=10)
    net = build_model(sample[0], in_channels=1, num_classes=10, image_size=(28, 28),
                      device="cpu")
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_space_errors_name_the_problem_and_the_allowed_values():
    with pytest.raises(ConfigError, match="empty along depth"):
        ConvNetDims(depths=())
    with pytest.raises(ConfigError, match="allowed: none, batch, layer, instance, group"):
        ConvNetDims(norms=("whiten",))
    with pytest.raises(ConfigError, match="does not fit 1x8x8 images") as info:
        check_candidates_fit(FIELD_SPACE.specs(), image_shape=(1, 8, 8), num_classes=10)
    assert "depth=4" in str(info.value)
    with pytest.raises(ConfigError, match="no candidate"):
        check_candidates_fit([], image_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(ConfigError) as info:
        load_scenario("nas-digits", ["space.norms=[]", "proxies.0.method=nope",
                                     "search.strategy=annealing"])
    text = str(info.value)
    assert "empty along norm" in text and "'nope' is not allowed" in text
    assert "allowed: grid, random, evolution" in text


# -- proxies and the ground-truth cache ------------------------------------------------------

@pytest.fixture(scope="module")
def held(digits_splits):
    return hold_out(digits_splits, per_class=10, seed=0)


def test_ground_truth_is_computed_once_and_read_back(held, tmp_path, monkeypatch):
    search_splits, validation = held
    calls = []
    real_train = gt_module.train_and_score

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(gt_module, "train_and_score", counting)
    specs = ["convnet(depth=1,width=8,norm=none,act=relu,pool=avg)",
             "convnet(depth=1,width=8,norm=instance,act=relu,pool=max)"]
    options = dict(validation=validation, validation_key={"per_class": 10, "seed": 0},
                   budget=TrainingBudget(epochs=2, batch_size=128),
                   cache=GroundTruthCache(tmp_path / "gt"), device="cpu")
    first = measure_ground_truth(specs, search_splits, **options)
    assert calls == specs and not any(t.cached for t in first)
    second = measure_ground_truth(specs, search_splits, **options)
    assert calls == specs, "a cached candidate was trained again"
    assert all(t.cached for t in second)
    assert [t.test for t in second] == [t.test for t in first]
    record = json.loads(next((tmp_path / "gt").glob("*.json")).read_text())
    assert record["key"]["dataset"]["fingerprint"] == search_splits.identity.fingerprint
    assert {"versions", "created", "device", "seconds"} <= set(record)
    # Another budget is another key.
    measure_ground_truth(specs[:1], search_splits,
                         **{**options, "budget": TrainingBudget(epochs=1)})
    assert len(calls) == 3


def _fake_artifact(folder, splits, *, classes, side):
    images = torch.zeros(classes * 2, 1, side, side)
    labels = torch.arange(classes).repeat_interleave(2)
    dataset = {**splits.identity.to_dict(), "num_classes": classes,
               "image_shape": [1, side, side]}
    save_artifact(folder, {"images_syn": images, "labels_syn": labels}, method="random",
                  config={}, seed=0, dataset=dataset,
                  input_space=splits.input_space.to_dict(), protocol={})
    return folder


def test_proxies_that_do_not_fit_are_refused(held, tmp_path):
    search_splits, _ = held
    with pytest.raises(InputSpaceMismatchError, match=r"images are \[1, 16, 16\]"):
        load_proxy(_fake_artifact(tmp_path / "big", search_splits, classes=10, side=16),
                   search_splits)
    with pytest.raises(InputSpaceMismatchError, match="has 5 classes but the test split"):
        load_proxy(_fake_artifact(tmp_path / "few", search_splits, classes=5, side=8),
                   search_splits)


def test_nas_needs_nni_and_says_how_to_install_it(monkeypatch, tmp_path):
    from ddsuite.applications.nas import require_nni
    from ddsuite.applications.nas.harness import run_nas_proxy

    monkeypatch.setitem(sys.modules, "nni", None)
    with pytest.raises(ImportError, match=r"pip install 'ddsuite\[nas\]'"):
        require_nni()
    scenario = load_scenario("nas-digits").config
    with pytest.raises(ConfigError, match=r"need NNI: pip install 'ddsuite\[nas\]'"):
        run_nas_proxy(scenario, out_dir=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


# -- through NNI -----------------------------------------------------------------------------

def test_a_diverging_candidate_is_failed_and_never_ranked(held, caplog):
    pytest.importorskip("nni")
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace

    from ddsuite.applications.nas import proxy_evaluator, search

    class Poison(nn.Module):
        def forward(self, x):
            return x * math.nan

    class TinySpace(ModelSpace, label_prefix="tiny"):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.act = LayerChoice([nn.ReLU(), Poison()], label="act")

        def forward(self, x):
            return self.head(self.act(x))

    search_splits, validation = held
    proxy = make_proxy("random", search_splits, ipc=2, seed=0)
    evaluator = proxy_evaluator(proxy, validation=validation,
                                budget=TrainingBudget(epochs=3, batch_size=20))
    trials = search(TinySpace(), evaluator, strategy="grid")
    assert len(trials) == 2
    good, bad = sorted(trials, key=lambda t: t.failed is not None)
    assert good.score is not None and 0 <= good.score <= 100 and good.failed is None
    assert bad.score is None and "diverged" in bad.failed and bad.accuracies == []
    assert any("not ranked" in r.getMessage() for r in caplog.records)


def test_a_diverging_convnet_spec_gets_no_number(held):
    from ddsuite.applications.nas.proxy import train_and_score

    search_splits, validation = held
    scores = train_and_score("convnet(depth=1,width=8,norm=none,act=relu,pool=avg)",
                             search_splits.train.images[:40], search_splits.train.labels[:40],
                             num_classes=10, budget=TrainingBudget(epochs=5, lr=1e12,
                                                                   batch_size=20),
                             scoring={"validation": validation}, device="cpu")
    assert scores["validation"].failed and scores["validation"].mean is None


def test_an_error_in_a_trial_is_raised_not_swallowed_by_nni(held):
    pytest.importorskip("nni")
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace

    from ddsuite.applications.nas import proxy_evaluator, search

    class Broken(nn.Linear):
        def __init__(self):
            super().__init__(64, 10)

        def forward(self, x):
            raise RuntimeError("shape bug in the user's module")

    class BrokenSpace(ModelSpace, label_prefix="broken"):
        def __init__(self):
            super().__init__()
            self.body = LayerChoice([Broken(), Broken()], label="body")

        def forward(self, x):
            return self.body(x)

    search_splits, validation = held
    proxy = make_proxy("random", search_splits, ipc=2, seed=0)
    evaluator = proxy_evaluator(proxy, validation=validation,
                                budget=TrainingBudget(epochs=1, batch_size=20))
    with pytest.raises(RuntimeError, match="shape bug"):
        search(BrokenSpace(), evaluator, strategy="grid")


def test_digits_scenario_end_to_end_through_nni(tmp_path, monkeypatch):
    pytest.importorskip("nni")
    calls = []
    real_train = gt_module.train_and_score
    monkeypatch.setattr(gt_module, "train_and_score",
                        lambda *a, **k: calls.append(a[0]) or real_train(*a, **k))
    cache = f"ground_truth.cache_dir={tmp_path / 'gt'}"
    loaded = load_scenario("nas-digits", [*CHEAP_SPACE, cache])
    summary = loaded.kind.run(loaded.config, out_dir=tmp_path / "run", device="cpu",
                              resolved=loaded.resolved)
    assert len(calls) == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["scenario"] == "nas-digits" and run["status"] == "finished"
    assert len(metrics["candidates"]) == 4 and metrics["versions"]["nni"] != "not installed"
    rows = metrics["proxies"]
    assert list(rows) == ["real data", "dm", "random", "herding"]
    for row in rows.values():
        assert row["ranked"] == 4 and row["picked"] in metrics["candidates"]
        assert -1 <= row["spearman"] <= 1 and row["search_seconds"] > 0
        assert row["picked_test"] == max(
            r["test"][0] for r in metrics["ground_truth"]["results"]
            if r["candidate"] == row["picked"])
    assert rows["real data"]["speedup"] == pytest.approx(1.0)
    assert "| dm " in summary and (tmp_path / "run" / "plots" / "proxy_vs_real.png").is_file()

    # Again with NNI's random strategy: the ground truth comes from the cache.
    loaded = load_scenario("nas-digits", [*CHEAP_SPACE, cache, "search.strategy=random",
                                          "search.max_trials=2", "proxies=[{method: random}]"])
    loaded.kind.run(loaded.config, out_dir=tmp_path / "again", device="cpu",
                    resolved=loaded.resolved)
    assert len(calls) == 4, "the ground truth was trained again"
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert all(r["cached"] for r in again["ground_truth"]["results"])
    assert again["proxies"]["random"]["search_trials"] == 2
    assert again["proxies"]["random"]["ranked"] == 4


def test_readme_example_scores_a_user_space_on_a_distilled_proxy():
    pytest.importorskip("nni")
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- nas-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README's NNI example is missing"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102
    assert len(namespace["trials"]) == 2 and namespace["best"].score > 10


def test_bad_input_found_before_the_report_folder_names_what_is_allowed(tmp_path):
    """A too-large validation split and a bad distill_model stop the run before anything is
    written; an unknown strategy is reported alone, without a max_trials complaint."""
    pytest.importorskip("nni")
    with pytest.raises(ConfigError) as info:
        load_scenario("nas-digits", ["search.strategy=bayes"])
    assert "strategy: 'bayes' is not allowed" in str(info.value)
    assert "max_trials" not in str(info.value)
    for override, expected in (("validation_per_class=500",
                                "validation_per_class 500 would hold out every training "
                                "image of class"),
                               ("distill_model=convnet(depth=0)", "depth")):
        loaded = load_scenario("nas-digits", [*CHEAP_SPACE, override])
        with pytest.raises(ConfigError, match=re.escape(expected)):
            loaded.kind.run(loaded.config, out_dir=tmp_path / "run", device="cpu",
                            resolved=loaded.resolved)
        assert not (tmp_path / "run").exists()


def test_a_proxy_that_ranked_no_candidate_claims_no_speed_up():
    from ddsuite.applications.nas.harness import _row

    row = _row([], {}, {"a": 90.0}, search_seconds=5.0, real_seconds=100.0, proxy=None)
    assert row["ranked"] == 0 and row["speedup"] is None and row["speedup_with_making"] is None
