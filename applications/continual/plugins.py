"""Avalanche plugins that put a condensed memory to work.

- `distilled_replay(...)`: Avalanche's own `ReplayPlugin` with a `CondensedBuffer` as its
  storage policy. Minibatches mix the current experience with the memory; the memory is
  condensed after each experience.
- `RetrainOnMemoryPlugin`: the protocol of the dataset-distillation papers (GDumb-style).
  Before each experience the memory absorbs it, the model goes back to its initial weights and
  is trained on the memory alone.

Example (an existing Avalanche `Naive` strategy gets distilled replay with one plugin)::

    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=64,
                     plugins=[distilled_replay(mem_size=100, method="dm")])
"""

from __future__ import annotations

import copy
from typing import Any

from avalanche.training.plugins import ReplayPlugin, SupervisedPlugin
from avalanche.training.storage_policy import ExemplarsBuffer

from .memory import CondensedBuffer

__all__ = ["RetrainOnMemoryPlugin", "distilled_replay"]


def distilled_replay(mem_size: int, *, method: str = "dm", batch_size: int | None = None,
                     batch_size_mem: int | None = None, **buffer_options: Any) -> ReplayPlugin:
    """A `ReplayPlugin` whose memory `method` condenses from each experience.

    Args:
        mem_size: images the memory holds in total.
        method: a registered ddsuite method (`ddsuite list methods`).
        batch_size, batch_size_mem: as in Avalanche's `ReplayPlugin`.
        buffer_options: passed to `CondensedBuffer` (method_config, total_num_groups, seed,
            device, ...).
    """
    storage = CondensedBuffer(mem_size, method=method, **buffer_options)
    return ReplayPlugin(mem_size=mem_size, batch_size=batch_size,
                        batch_size_mem=batch_size_mem, storage_policy=storage)


class RetrainOnMemoryPlugin(SupervisedPlugin):
    """Train from scratch on the memory after it absorbs each experience.

    Works with any storage policy (`CondensedBuffer`, or Avalanche's reservoir and
    class-balanced buffers). The model returns to the weights it had when the first experience
    began; the strategy's optimizer is rebuilt for it by Avalanche as usual, and the strategy's
    `train_epochs` are run over the memory only.
    """

    def __init__(self, storage_policy: ExemplarsBuffer):
        super().__init__()
        self.storage_policy = storage_policy
        self.init_model = None

    def before_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        if self.init_model is None:
            self.init_model = copy.deepcopy(strategy.model)
        else:
            strategy.model = copy.deepcopy(self.init_model)
        strategy.model_adaptation(self.init_model)

    def before_eval_dataset_adaptation(self, strategy, **kwargs) -> None:
        strategy.model_adaptation(self.init_model)

    def after_train_dataset_adaptation(self, strategy, **kwargs) -> None:
        self.storage_policy.post_adapt(strategy, strategy.experience)
        strategy.adapted_dataset = self.storage_policy.buffer
