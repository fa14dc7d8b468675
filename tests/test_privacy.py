"""Private distillation, DP-SGD and membership-inference audits (applications/privacy)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("opacus")

from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402

from ddsuite.applications.privacy import (  # noqa: E402
    MembershipSplitError,
    PrivacyBudgetError,
    PrivateModelError,
    UnaccountedReleaseError,
    clip_per_sample,
    noisy_class_sums,
    plan_privacy,
    poisson_sample,
    spent_epsilon,
)
from ddsuite.applications.privacy.audit import (  # noqa: E402
    MembershipSplit,
    attack_metrics,
    lira_offline_scores,
    make_membership_split,
)
from ddsuite.applications.privacy.distillers import DPDCConfig, DPDMConfig  # noqa: E402
from ddsuite.applications.privacy.dpsgd import DPSGDConfig, train_dp_sgd  # noqa: E402
from ddsuite.applications.privacy.inputs import normalisation_record  # noqa: E402
from ddsuite.applications.privacy.ledger import distill_private  # noqa: E402
from ddsuite.core.engine import Callback, distill  # noqa: E402
from ddsuite.core.errors import ConfigError  # noqa: E402
from ddsuite.core.methods import config_from_dict, get_method  # noqa: E402

MODEL = "convnet(width=8, depth=2)"
TINY = {"ipc": 2, "iterations": 3, "model": MODEL, "batch_real": 8}


# -- accounting against Opacus's accountants ------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.5, 8.0), rate=st.floats(1e-3, 0.5), steps=st.integers(1, 3000))
def test_spent_epsilon_matches_opacus_rdp_stepped_one_step_at_a_time(sigma, rate, steps):
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    expected = accountant.get_epsilon(delta=1e-5)
    got = spent_epsilon(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5)
    assert got == pytest.approx(expected, rel=1e-9)


@settings(max_examples=5, deadline=None)
@given(sigma=st.floats(0.8, 4.0), rate=st.floats(0.01, 0.2), steps=st.integers(10, 500))
def test_spent_epsilon_matches_opacus_prv(sigma, rate, steps):
    accountant = PRVAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    got = spent_epsilon(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5,
                        accountant="prv")
    assert got == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(target=st.floats(0.5, 20.0), rate=st.floats(0.01, 0.3), steps=st.integers(10, 800))
def test_noise_from_target_spends_at_most_the_target_and_close_to_it(target, rate, steps):
    plan = plan_privacy(delta=1e-5, sample_rate=rate, steps=steps, clip_norm=1.0,
                        target_epsilon=target)
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, rate, steps)]
    spent = accountant.get_epsilon(delta=1e-5)
    assert plan.epsilon == pytest.approx(spent, rel=1e-9)
    assert target - 0.011 <= spent <= target  # Opacus's search tolerance is 0.01


def test_prv_and_rdp_are_both_recorded_and_prv_is_not_looser_here():
    common = dict(delta=1e-5, sample_rate=0.05, steps=500, clip_norm=1.0, target_epsilon=2.0)
    rdp, prv = plan_privacy(**common), plan_privacy(**common, accountant="prv")
    assert (rdp.accountant, prv.accountant) == ("rdp", "prv")
    assert prv.noise_multiplier <= rdp.noise_multiplier


# -- the mechanism --------------------------------------------------------------------------


def test_poisson_sampling_rates_and_empty_batches():
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([len(poisson_sample(200, 0.05, generator=g, device="cpu"))
                          for _ in range(2000)], dtype=torch.float64)
    assert sizes.mean().item() == pytest.approx(10.0, abs=0.3)  # n * q
    assert sizes.var().item() == pytest.approx(200 * 0.05 * 0.95, rel=0.15)  # binomial
    counts = torch.zeros(20)
    for _ in range(4000):
        counts[poisson_sample(20, 0.05, generator=g, device="cpu")] += 1
    assert (counts / 4000 - 0.05).abs().max() < 0.015  # every example in with prob q
    empty = sum(len(poisson_sample(20, 0.05, generator=g, device="cpu")) == 0
                for _ in range(2000))
    assert 0.30 < empty / 2000 < 0.42  # 0.95 ** 20 = 0.358
    batch = poisson_sample(10, 1e-9, generator=g, device="cpu")
    assert batch.shape == (0,) and batch.dtype == torch.int64


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-3, 1e4), clip=st.floats(0.01, 10.0), seed=st.integers(0, 1000))
def test_clipping_bounds_every_row_and_keeps_short_rows(scale, clip, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(32, 17, generator=g, dtype=torch.float64) * scale
    values[0] = 0
    clipped = clip_per_sample(values, clip)
    assert (clipped.norm(dim=1) <= clip).all()
    short = values.norm(dim=1) < clip * 0.5
    assert torch.allclose(clipped[short], values[short], rtol=1e-5)
    # directions are kept
    cos = torch.nn.functional.cosine_similarity(clipped[1:], values[1:], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos))


def test_removing_one_example_moves_the_class_sums_by_at_most_the_clip_norm():
    g = torch.Generator().manual_seed(1)
    values = clip_per_sample(torch.randn(50, 9, generator=g) * 10, 1.5)
    labels = torch.randint(0, 4, (50,), generator=g)
    zero = torch.Generator()
    full = noisy_class_sums(values, labels, num_classes=4, noise_std=0.0, generator=zero)
    for i in range(50):
        keep = torch.arange(50) != i
        less = noisy_class_sums(values[keep], labels[keep], num_classes=4, noise_std=0.0,
                                generator=zero)
        assert (full - less).norm() <= 1.5 + 1e-5
    noisy = noisy_class_sums(values[:0], labels[:0], num_classes=4, noise_std=2.0,
                             generator=torch.Generator().manual_seed(3))
    assert noisy.shape == (4, 9) and noisy.std().item() == pytest.approx(2.0, rel=0.4)


# -- private distillers ---------------------------------------------------------------------


def test_dp_dm_artifact_records_what_was_spent(digits_splits, tmp_path):
    from ddsuite.core.synthetic import load_artifact

    config = {**TINY, "epsilon": 4.0, "delta": 1e-5}
    result, record = distill_private("dp-dm", splits=digits_splits, config=config, seed=0,
                                     out_dir=tmp_path / "set")
    meta = load_artifact(tmp_path / "set", device="cpu").meta
    stored = meta["privacy"]
    assert stored == meta["metrics"]["privacy"] == record
    assert stored["steps"] == 3 and stored["accountant"] == "rdp"
    n = len(digits_splits.train)
    assert stored["sample_rate"] == pytest.approx(8 * 10 / n)
    assert stored["epsilon"] <= 4.0
    assert stored["epsilon"] == pytest.approx(spent_epsilon(
        noise_multiplier=stored["noise_multiplier"], sample_rate=stored["sample_rate"],
        steps=3, delta=1e-5))
    assert meta["config"]["init"] == "noise"
    assert torch.isfinite(result.syn.images_syn).all()


def test_a_plain_engine_run_of_dp_dc_records_its_queries(digits_splits, tmp_path):
    """`ddsuite distill --method dp-dc` goes through the engine alone: its artifact must still
    say what was spent, counting every outer step as a query."""
    from ddsuite.core.synthetic import load_artifact

    config = {**TINY, "epsilon": 8.0, "outer_loop": 2}
    distill("dp-dc", splits=digits_splits, config=config, seed=0, out_dir=tmp_path / "set")
    stored = load_artifact(tmp_path / "set", device="cpu").meta["privacy"]
    assert stored["steps"] == 3 * 2 == stored["planned_steps"]
    assert stored["epsilon"] <= 8.0
    assert stored["epsilon"] == pytest.approx(spent_epsilon(
        noise_multiplier=stored["noise_multiplier"], sample_rate=stored["sample_rate"],
        steps=6, delta=stored["delta"]))


def test_dp_dm_runs_through_empty_batches(digits_splits):
    result = distill("dp-dm", splits=digits_splits, seed=0,
                     config={**TINY, "epsilon": None, "noise_multiplier": 1.0,
                             "sample_rate": 1e-9})
    before = distill("dp-dm", splits=digits_splits, seed=0,
                     config={**TINY, "iterations": 1, "epsilon": None,
                             "noise_multiplier": 1.0, "sample_rate": 1e-9})
    assert torch.isfinite(result.syn.images_syn).all()
    # the noisy target still moves the images: the mechanism released noise, not nothing
    assert not torch.equal(result.syn.images_syn, before.syn.images_syn)


def test_dp_dc_counts_one_query_per_outer_step(digits_splits):
    config = {**TINY, "iterations": 2, "outer_loop": 2, "inner_loop": 1, "epsilon": 8.0}
    result, record = distill_private("dp-dc", splits=digits_splits, config=config, seed=0)
    assert record["steps"] == 4 and record["epsilon"] <= 8.0
    assert torch.isfinite(result.syn.images_syn).all()


def test_dp_sgd_spends_at_most_its_target_and_learns(digits_splits):
    train = digits_splits.train
    result = train_dp_sgd(train.images, train.labels, model=MODEL, num_classes=10,
                          config=DPSGDConfig(epsilon=8.0, epochs=4, batch_size=64),
                          device="cpu", seed=0)
    p = result.privacy
    assert p["epsilon"] <= 8.0 and p["steps"] == 4 * math.ceil(len(train) / 64)
    with torch.no_grad():
        accuracy = (result.model(digits_splits.test.images).argmax(1)
                    == digits_splits.test.labels).float().mean().item()
    assert accuracy > 0.3  # chance is 0.1


def test_dp_sgd_takes_noise_only_steps_on_empty_poisson_batches(digits_splits):
    """100 examples at batch 1: each step's batch is empty with probability 0.99^100 ~ 0.37,
    so a run of 100 steps meets many; each must still be a noisy, accounted step."""
    train = digits_splits.train
    images, labels = train.images[:100], train.labels[:100]
    for model in ("mlp", MODEL):
        result = train_dp_sgd(images, labels, model=model, num_classes=10,
                              config=DPSGDConfig(epsilon=10.0, epochs=1, batch_size=1),
                              device="cpu", seed=0)
        assert result.privacy["steps"] == 100
        assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_private_distillers_report_no_batch_size(digits_splits):
    """The Poisson batch size is neither noised nor accounted: it must not reach the logs."""

    class Keys(Callback):
        seen: set[str] = set()

        def on_step(self, ctx, metrics):
            self.seen |= set(metrics)

    for method, extra in (("dp-dm", {}), ("dp-dc", {"outer_loop": 1, "inner_loop": 1})):
        keys = Keys()
        keys.seen = set()
        distill(method, splits=digits_splits, seed=0, callbacks=[keys],
                config={**TINY, **extra, "iterations": 2, "epsilon": 8.0})
        assert keys.seen == {"loss"}, method


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf])
def test_epsilon_must_be_positive_and_finite(epsilon):
    with pytest.raises(ConfigError, match="epsilon must be a finite number > 0"):
        config_from_dict(get_method("dp-dm").Config, {**TINY, "epsilon": epsilon})


def test_delta_at_or_above_one_over_n_is_refused(digits_splits):
    n = len(digits_splits.train)
    with pytest.raises(PrivacyBudgetError, match=r"not below 1/n .* choose delta <"):
        distill("dp-dm", splits=digits_splits, config={**TINY, "delta": 1.0 / n})


def test_unreachable_target_names_the_smallest_reachable_epsilon(digits_splits):
    with pytest.raises(PrivacyBudgetError, match="cannot be reached.*raise epsilon above"):
        distill("dp-dm", splits=digits_splits, config={**TINY, "iterations": 200,
                                                       "epsilon": 1e-4})


def test_real_init_is_refused_by_private_distillers():
    for method in ("dp-dm", "dp-dc"):
        with pytest.raises(ConfigError, match="without any privacy accounting.*init: noise"):
            config_from_dict(get_method(method).Config, {**TINY, "init": "real"})


@pytest.mark.parametrize("config_cls", [DPDMConfig, DPDCConfig])
def test_real_init_in_a_typed_config_is_refused_by_the_distiller(digits_splits, config_cls):
    method = "dp-dm" if config_cls is DPDMConfig else "dp-dc"
    for init in ("real", "kmeans"):
        config = config_cls(init=init, ipc=2, iterations=1, model=MODEL)
        with pytest.raises(UnaccountedReleaseError, match=rf"init '{init}'.*init: noise"):
            distill(method, splits=digits_splits, config=config)
        with pytest.raises(UnaccountedReleaseError, match="init: noise"):
            distill_private(method, splits=digits_splits, config=config)
    # a config changed after the distiller was built is caught before any image is drawn
    config = config_cls(ipc=2, iterations=1, model=MODEL).resolve(dataset="digits")
    distiller = get_method(method)(config, splits=digits_splits, device="cpu")
    distiller.config.init = "real"
    with pytest.raises(UnaccountedReleaseError, match="init: noise"):
        distiller.initialize(torch.Generator().manual_seed(0))


def test_zca_fitted_on_the_private_images_is_refused():
    from ddsuite.core.data import load_dataset
    from ddsuite.scenarios.registry import load_scenario

    whitened = load_dataset("digits", zca=True)
    for method in ("dp-dm", "dp-dc"):
        with pytest.raises(UnaccountedReleaseError, match=r"ZCA-whitened.*dataset.zca: false"):
            distill(method, splits=whitened, config={**TINY, "epsilon": 8.0})
    with pytest.raises(ConfigError, match="dataset.zca: .*private targets need"):
        load_scenario("privacy-digits", ["dataset.zca=true"])


def test_the_record_says_whether_the_normalisation_was_fitted_on_private_data(
        digits_splits, caplog, monkeypatch):
    from dataclasses import replace

    from ddsuite.applications.privacy import inputs
    from ddsuite.core.data import InputSpace

    monkeypatch.setattr(inputs, "_warned", set())  # the warning is logged once per process
    caplog.set_level("WARNING", logger="ddsuite.applications.privacy.inputs")
    result, record = distill_private("dp-dm", splits=digits_splits, seed=0,
                                     config={**TINY, "iterations": 1, "epsilon": 8.0})
    fitted = record["normalisation"]
    assert fitted["fitted_on_private_data"] is True
    assert fitted["mean"] == list(digits_splits.input_space.mean)
    assert "normalisation constants" in record["public"]
    assert "fitted on the training split" in caplog.text
    # MNIST's published constants are not a statistic of the private data
    mnist = replace(digits_splits, identity=replace(digits_splits.identity, name="mnist[members]"),
                    input_space=InputSpace((0.1307,), (0.3081,)))
    published = normalisation_record(mnist, what="dp-dm")
    assert published["fitted_on_private_data"] is False
    assert "published constants of mnist" in published["origin"]


@pytest.mark.parametrize("clip", [math.inf, math.nan, 0.0])
def test_clip_norm_must_be_finite_and_positive(digits_splits, clip):
    for method in ("dp-dm", "dp-dc"):
        with pytest.raises(ConfigError, match="clip_norm must be a finite number > 0"):
            config_from_dict(get_method(method).Config, {**TINY, "clip_norm": clip})
    # a typed config skips problems(); the distiller checks again
    with pytest.raises(PrivacyBudgetError, match="clip_norm must be a finite number > 0"):
        distill("dp-dm", splits=digits_splits, config=DPDMConfig(ipc=2, iterations=1,
                                                                 model=MODEL, clip_norm=clip))
    assert any("clip_norm: must be a finite number > 0" in p
               for p in DPSGDConfig(clip_norm=clip).problems())
    train = digits_splits.train
    with pytest.raises(PrivacyBudgetError, match="clip_norm: must be a finite number > 0"):
        train_dp_sgd(train.images, train.labels, model=MODEL, num_classes=10,
                     config=DPSGDConfig(clip_norm=clip), device="cpu")


def test_scenario_refuses_bad_clip_norms_before_any_folder(tmp_path):
    from ddsuite.scenarios.registry import load_scenario

    for override in ("dp_sgd.clip_norm=.inf", "private_options.clip_norm=.nan"):
        with pytest.raises(ConfigError, match="clip_norm.*must be a finite number > 0"):
            load_scenario("privacy-digits", [override])


def test_batchnorm_is_refused_with_the_fix(digits_splits):
    with pytest.raises(PrivateModelError, match="BatchNorm modules: features.1"):
        distill("dp-dm", splits=digits_splits, config={**TINY, "model": "convnet-bn(width=8, "
                                                                         "depth=2)"})
    train = digits_splits.train
    bn = "convnet-bn(width=8, depth=2)"
    with pytest.raises(PrivateModelError, match="fix_model: true"):
        train_dp_sgd(train.images, train.labels, model=bn, num_classes=10,
                     config=DPSGDConfig(epsilon=8.0, epochs=1), device="cpu")
    fixed = train_dp_sgd(train.images, train.labels, model=bn, num_classes=10,
                         config=DPSGDConfig(epsilon=8.0, epochs=1, fix_model=True),
                         device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fixed.model.modules())


def test_overlapping_membership_splits_are_refused():
    with pytest.raises(MembershipSplitError, match="share 2 example"):
        MembershipSplit(members=torch.tensor([0, 1, 2]), non_members=torch.tensor([2, 3, 1]),
                        shadow_pool=torch.tensor([5, 6]), seed=0)
    with pytest.raises(MembershipSplitError, match="shadow pool"):
        make_membership_split(100, members=40, non_members=40, seed=0)
    split = make_membership_split(99, members=33, non_members=33, seed=0)
    union = torch.cat([split.members, split.non_members, split.shadow_pool])
    assert sorted(union.tolist()) == list(range(99))


# -- attacks --------------------------------------------------------------------------------


def test_attack_metrics_on_separable_and_on_random_scores():
    is_member = np.r_[np.ones(500), np.zeros(500)]
    perfect = attack_metrics(is_member + 0.0, is_member, bootstrap=50)
    assert perfect["auc"]["value"] == 1.0 and perfect["balanced_accuracy"]["value"] == 1.0
    assert perfect["tpr_at_0.001_fpr"]["value"] == 1.0
    rng = np.random.default_rng(0)
    chance = attack_metrics(rng.normal(size=1000), is_member, bootstrap=200)
    auc = chance["auc"]
    assert auc["ci_low"] <= 0.5 <= auc["ci_high"] and auc["ci_low"] <= auc["value"]
    assert chance["tpr_at_0.01_fpr"]["value"] < 0.05


def test_balanced_accuracy_interval_covers_chance_on_pure_noise():
    """The best threshold on the same data is biased upwards (its interval used to sit above
    0.5 for scores with no signal); the held-out balanced accuracy is not."""
    is_member = np.r_[np.ones(300), np.zeros(300)]
    covered = []
    for seed in range(10):
        scores = np.random.default_rng(100 + seed).normal(size=600)
        m = attack_metrics(scores, is_member, bootstrap=100, seed=seed)["balanced_accuracy"]
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
        assert m["held_out_members"] == m["held_out_non_members"] == 150
        covered.append(m["ci_low"] <= 0.5 <= m["ci_high"])
    assert sum(covered) >= 8, covered


def test_attack_metrics_need_a_bootstrap_and_two_of_each():
    is_member = np.r_[np.ones(10), np.zeros(10)]
    with pytest.raises(MembershipSplitError, match="bootstrap must be an integer >= 1"):
        attack_metrics(np.arange(20.0), is_member, bootstrap=0)
    with pytest.raises(MembershipSplitError, match="at least 2 members and 2 non-members"):
        attack_metrics(np.arange(11.0), np.r_[np.ones(1), np.zeros(10)], bootstrap=5)


def test_lira_ranks_by_distance_above_the_out_distribution():
    shadows = torch.tensor([[0.0, 5.0], [0.2, 5.2], [-0.2, 4.8]])
    # example 0 sits far above its out-mean; example 1 exactly at it
    scores = lira_offline_scores(torch.tensor([2.0, 5.0]), shadows)
    assert scores[0] > 5 and abs(scores[1]) < 1e-5


# -- the scenario ---------------------------------------------------------------------------


@pytest.mark.slow
def test_privacy_digits_scenario_end_to_end(tmp_path):
    from ddsuite.scenarios.registry import load_scenario

    loaded = load_scenario("privacy-digits", [
        "epsilons=[10]", "distill_options.iterations=20", "private_options.iterations=20",
        "dp_sgd.epochs=3", "train.real_epochs=15", "train.syn_epochs=40",
        "audit.shadows=1", "audit.bootstrap=20", "device=cpu"])
    out = tmp_path / "report"
    summary = loaded.kind.run(loaded.config, out_dir=out, resolved=loaded.resolved)
    metrics = json.loads((out / "metrics.json").read_text())
    split = metrics["membership"]
    assert not set(split["members"]) & set(split["non_members"])
    assert not set(split["shadow_pool"]) & (set(split["members"]) | set(split["non_members"]))
    results = metrics["results"]
    assert list(results) == ["real", "distilled", "dp-distilled@10", "dp-sgd@10"]
    assert results["real"]["test_accuracy"] > 0.8
    for label in ("dp-distilled@10", "dp-sgd@10"):
        privacy = results[label]["privacy"]
        assert 0 < privacy["epsilon"] <= 10 and privacy["delta"] == 1e-5
    for entry in results.values():
        for attack in ("loss", "lira"):
            m = entry["attacks"][attack]
            assert m["members"] == m["non_members"] == len(split["members"])
            assert m["auc"]["ci_low"] <= m["auc"]["value"] <= m["auc"]["ci_high"]
    meta = json.loads((out / "sets" / "dp-distilled@10" / "artifact.json").read_text())
    assert meta["privacy"]["epsilon"] == results["dp-distilled@10"]["privacy"]["epsilon"]
    for plot in ("roc_loss.png", "roc_lira.png", "accuracy_vs_epsilon.png"):
        assert (out / "plots" / plot).stat().st_size > 1000
    assert "| dp-sgd@10" in summary and "TPR @ 0.1% FPR" in summary


def test_scenario_reports_every_problem_at_once(digits_splits):
    from ddsuite.scenarios.registry import load_scenario

    with pytest.raises(ConfigError) as info:
        load_scenario("privacy-digits", ["epsilons=[0, 5]", "targets=[real, bogus]",
                                         "private_options.init=real", "audit.shadows=0"])
    text = str(info.value)
    for expected in ("epsilon must be a finite number > 0", "targets:", "init: noise",
                     "lira needs >= 1 shadow"):
        assert expected in text


def test_scenario_refuses_a_bootstrap_of_zero_and_duplicate_epsilons():
    from ddsuite.scenarios.registry import load_scenario

    with pytest.raises(ConfigError, match="bootstrap: must be >= 1"):
        load_scenario("privacy-digits", ["audit.bootstrap=0"])
    for epsilons in ("[1, 1]", "[1, 1.0000001, 10]"):
        same = r"epsilons: 1\.0, 1\.0.* are the same target \(each labelled @1\)"
        with pytest.raises(ConfigError, match=same):
            load_scenario("privacy-digits", [f"epsilons={epsilons}"])


def test_scenario_messages_name_each_problem_once(digits_splits):
    from ddsuite.applications.privacy.harness import _membership, _precheck
    from ddsuite.scenarios.registry import load_scenario

    with pytest.raises(ConfigError) as info:
        load_scenario("privacy-digits", ["accountant=foo", "delta=2",
                                         "private_options.noise_multiplier=2",
                                         "private_options.clip_norm=-1"])
    text = str(info.value)
    assert text.count("'foo'") == 1 and text.count("delta must lie in (0, 1)") == 1
    assert "private_options: give exactly one of epsilon" in text
    assert "private_options.clip_norm must be a finite number > 0" in text
    loaded = load_scenario("privacy-digits", ["model=convnet-bn(width=8, depth=2)",
                                              "targets=[dp-sgd]", "epsilons=[1]"])
    config = loaded.config
    with pytest.raises(ConfigError) as info:
        _precheck(config, digits_splits, _membership(config, digits_splits),
                  torch.device("cpu"))
    text = str(info.value)
    assert "dp-sgd@1: model 'convnet-bn(width=8, depth=2)'" in text
    assert "dp-sgd@1: dp-sgd@1" not in text


def test_privacy_report_records_the_resolved_scenario_with_empty_dp_sgd_batches(tmp_path):
    """The command of the empty-batch report (batch 2 on 449 members), on an MLP: the run
    finishes, metrics.json holds the resolved scenario, summary.md describes the overrides."""
    from ddsuite.scenarios.registry import load_scenario

    loaded = load_scenario("privacy-digits", [
        "targets=[real, dp-sgd]", "epsilons=[7]", "dp_sgd.batch_size=2", "dp_sgd.epochs=1",
        "audit.shadows=1", "audit.bootstrap=5", "model=mlp", "train.real_epochs=2",
        "device=cpu"])
    out = tmp_path / "report"
    summary = loaded.kind.run(loaded.config, out_dir=out, resolved=loaded.resolved)
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["config"]
    assert config["targets"] == ["real", "dp-sgd"] and config["epsilons"] == [7]
    assert config["dp_sgd"]["batch_size"] == 2 and config["audit"]["shadows"] == 1
    assert "private_options" in config and "distill_options" in config
    privacy = metrics["results"]["dp-sgd@7"]["privacy"]
    assert privacy["steps"] > 0 and privacy["normalisation"]["fitted_on_private_data"]
    assert "epsilon 7 " in summary and "1 shadow(s)" in summary
    assert "epsilon 1 and 10" not in summary and "(2 shadows)" not in summary
    assert "held out" in summary


@pytest.mark.shared_data
def test_privacy_mnist_scenario_passes_its_prechecks(shared_data_root):
    from ddsuite.applications.privacy.harness import _membership, _precheck
    from ddsuite.core.data import load_dataset
    from ddsuite.scenarios.registry import load_scenario

    loaded = load_scenario("privacy-mnist", [f"dataset.data_root={shared_data_root}"])
    config = loaded.config
    splits = load_dataset("mnist", data_root=str(shared_data_root))
    split = _membership(config, splits)
    assert (len(split.members), len(split.non_members), len(split.shadow_pool)) == (
        10000, 10000, 40000)
    _precheck(config, splits, split, torch.device("cpu"))  # budgets reachable, model valid


def test_readme_privacy_example_runs(tmp_path, monkeypatch):
    readme = Path(__file__).resolve().parents[1] / "README.md"
    match = re.search(r"<!-- privacy-example -->\s*```python\n(.*?)```",
                      readme.read_text(encoding="utf-8"), re.S)
    assert match, "the README's DP distillation example is missing"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102
    privacy = namespace["privacy"]
    assert privacy["steps"] == 100 and privacy["accountant"] == "rdp"
    assert 0.9 < privacy["epsilon"] <= 1.0
    assert privacy["noise_multiplier"] > 1.0


def test_cli_distill_of_a_private_method_reports_its_budget(tmp_path, caplog):
    """`ddsuite distill --method dp-dm` puts the spent budget in metrics.json and summary.md,
    and warns when the epsilon is too large to mean anything."""
    from ddsuite.cli.main import main

    out = tmp_path / "set"
    argv = ["distill", "--dataset", "digits", "--method", "dp-dm", "--ipc", "1",
            "--iterations", "2", "--out", str(out), "--set", f"model={MODEL}",
            "--set", "epsilon=null", "--set", "noise_multiplier=0.01",
            "--num-eval", "1", "--eval-epochs", "2", "--eval-augmentation", "none"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["privacy"]["steps"] == 2 and metrics["privacy"]["epsilon"] > 50
    assert "privacy: accountant rdp" in (out / "summary.md").read_text()
    assert "practically no protection" in caplog.text


def test_dp_dm_defaults_to_an_image_lr_suited_to_clipped_embeddings():
    assert DPDMConfig().resolve(dataset="mnist").lr_images == 100.0
    assert DPDMConfig(lr_images=2.0).resolve(dataset="mnist").lr_images == 2.0


def test_a_budget_set_inside_dp_sgd_is_refused_not_silently_replaced():
    from ddsuite.scenarios.registry import load_scenario

    with pytest.raises(ConfigError) as info:
        load_scenario("privacy-digits", ["dp_sgd.epsilon=3", "dp_sgd.accountant=prv"])
    text = str(info.value)
    assert "dp_sgd: epsilon, accountant come from the top level" in text
    assert "epsilons, delta, accountant" in text
    load_scenario("privacy-digits", ["dp_sgd.clip_norm=2.0"])  # its own options stay its own
