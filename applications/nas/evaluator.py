"""Score sampled candidates on a proxy with NNI: a `FunctionalEvaluator` and a search loop.

`proxy_evaluator` wraps a `ProxyScorer`: for each model NNI samples it trains fresh networks
on the proxy under a fixed budget and reports their mean validation accuracy (a plain float)
through `nni.report_final_result`. A candidate whose training diverges is logged and raised
as `CandidateDivergedError`, so NNI marks the trial failed and no strategy ever ranks it.

`search` runs a strategy (exhaustive grid, NNI's `Random` or `RegularizedEvolution`, or any
NNI strategy object) in NNI's in-process sequential engine. To spread trials over GPUs or
machines, use NNI's `NasExperiment` with a training-service engine and the same evaluator.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import nni
import torch
from nni.nas.evaluator import FunctionalEvaluator
from nni.nas.execution import SequentialExecutionEngine
from nni.nas.space import SimplifiedModelSpace
from nni.nas.strategy import GridSearch, Random, RegularizedEvolution, Strategy
from torch import Tensor, nn

from ddsuite.core.errors import DDSuiteError

from .proxy import ProxySet, TrainingBudget, train_and_score
from .space import candidate_of

__all__ = ["STRATEGIES", "CandidateDivergedError", "ProxyScorer", "TrialRecord",
           "make_strategy", "proxy_evaluator", "search"]

logger = logging.getLogger(__name__)

STRATEGIES = ("grid", "random", "evolution")


class CandidateDivergedError(DDSuiteError, FloatingPointError):
    """A candidate whose training on the proxy gave a non-finite loss or weight."""


@dataclass
class TrialRecord:
    """One candidate scored on one proxy."""

    candidate: str
    score: float | None
    """Mean validation accuracy (%), None when the candidate failed."""
    accuracies: list[float]
    seconds: float
    failed: str | None = None
    sample: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProxyScorer:
    """The function NNI's `FunctionalEvaluator` calls with each sampled model.

    Scores are memoised by candidate: a candidate proposed twice (by another strategy run on
    the same scorer) is reported again from the memo, and its training time counts again,
    as if it had been retrained.

    Args:
        proxy: the training set.
        validation: ``(images, labels)`` the candidates are scored on.
        budget: epochs, lr, batch size, augmentation and networks per candidate.
        device: where candidates train.
        seed: network k of a candidate is initialised from seed + k.
    """

    def __init__(self, proxy: ProxySet, *, validation: tuple[Tensor, Tensor],
                 budget: TrainingBudget, device: torch.device | str = "cpu", seed: int = 0):
        self.proxy = proxy
        self.validation = validation
        self.budget = budget
        self.device = torch.device(device)
        self.seed = seed
        self.memo: dict[str, TrialRecord] = {}
        self.trials: list[TrialRecord] = []
        """Every evaluation in order, memoised ones included."""
        self.error: BaseException | None = None
        """The first error other than divergence; later calls re-raise it at once."""

    def __call__(self, model: nn.Module) -> None:
        if self.error is not None:
            raise self.error
        current = nni.get_current_parameter()  # NNI's frozen model, with its sample
        sample = dict(getattr(current, "sample", None) or {})
        key = candidate_of(model, sample)
        try:
            record = self.memo.get(key) or self._score(model, key, sample)
        except Exception as exc:  # recorded so the caller can re-raise it after NNI's engine
            self.error = exc
            raise
        self.memo[key] = record
        self.trials.append(record)
        if record.failed:
            logger.warning("candidate %s failed on proxy %r (%s); it is not ranked", key,
                           self.proxy.name, record.failed)
            raise CandidateDivergedError(f"{key} on proxy {self.proxy.name!r}: {record.failed}")
        nni.report_final_result(record.score)

    def _score(self, model: nn.Module, key: str, sample: dict[str, Any]) -> TrialRecord:
        candidate: str | nn.Module = getattr(model, "spec", None) or model
        scores = train_and_score(
            candidate, self.proxy.images, self.proxy.labels,
            num_classes=self.proxy.num_classes, budget=self.budget,
            scoring={"validation": self.validation}, device=self.device, seed=self.seed)
        result = scores["validation"]
        logger.info("%s on %s: %s (%.1fs)", key, self.proxy.name,
                    result.failed or f"{result.mean:.2f}%", result.seconds)
        return TrialRecord(candidate=key, score=result.mean, accuracies=result.accuracies,
                           seconds=result.seconds, failed=result.failed, sample=sample)


def proxy_evaluator(proxy: ProxySet, *, validation: tuple[Tensor, Tensor],
                    budget: TrainingBudget, device: torch.device | str = "cpu",
                    seed: int = 0) -> FunctionalEvaluator:
    """An NNI `FunctionalEvaluator` that trains each sampled model on `proxy`.

    Its scorer (with the memo and the trial log) is ``evaluator.function``.
    """
    return FunctionalEvaluator(ProxyScorer(proxy, validation=validation, budget=budget,
                                           device=device, seed=seed))


def make_strategy(name: str, *, seed: int = 0, population_size: int = 10,
                  sample_size: int = 3, mutation_prob: float = 0.5) -> Strategy:
    """"grid" (every candidate, in grid order), "random" or "evolution" (NNI's)."""
    if name == "grid":
        return GridSearch(shuffle=False, seed=seed)
    if name == "random":
        return Random(seed=seed)
    if name == "evolution":
        return RegularizedEvolution(population_size=population_size, sample_size=sample_size,
                                    mutation_prob=mutation_prob, seed=seed)
    raise DDSuiteError(f"unknown search strategy {name!r}; allowed: {', '.join(STRATEGIES)}")


def search(model_space: nn.Module, evaluator: FunctionalEvaluator, *,
           strategy: str | Strategy = "grid", max_trials: int | None = None,
           seed: int = 0) -> list[TrialRecord]:
    """Run `strategy` over `model_space` in NNI's in-process sequential engine.

    Args:
        model_space: an NNI `ModelSpace` (`ConvNetSpace` or a user's own).
        evaluator: from `proxy_evaluator`.
        strategy: "grid", "random", "evolution", or an NNI strategy object.
        max_trials: stop after this many trials; None: until the strategy stops (a grid
            visits every candidate once).
        seed: the strategy's seed when it is given by name.

    Returns:
        The trials of this search in order (failed ones included, with `failed` set).

    Raises:
        The first error a trial raised other than a diverged candidate.
    """
    scorer = evaluator.function
    if not isinstance(scorer, ProxyScorer):
        raise DDSuiteError("search() needs an evaluator made by proxy_evaluator()")
    if isinstance(strategy, str):
        strategy = make_strategy(strategy, seed=seed)
    if max_trials is None and not isinstance(strategy, GridSearch):
        raise DDSuiteError(f"{type(strategy).__name__} needs max_trials (it never stops alone)")
    executable = SimplifiedModelSpace.from_model(model_space, evaluator)
    engine = SequentialExecutionEngine(max_model_count=max_trials, continue_on_failure=True)
    before = len(scorer.trials)
    start = time.perf_counter()
    strategy(executable, engine)
    if scorer.error is not None:
        error, scorer.error = scorer.error, None
        raise error
    trials = scorer.trials[before:]
    logger.info("%s: %d trials in %.1fs", type(strategy).__name__, len(trials),
                time.perf_counter() - start)
    return trials
