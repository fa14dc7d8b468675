"""Expert trajectories: networks trained on the real data, one parameter snapshot per epoch.

Trajectory-matching distillers (MTT, TESLA) unroll a student on the synthetic set from one
expert snapshot and match a later one. Experts are trained once per setting and cached:

    spec = ExpertSpec(model="convnet", epochs=50, num_experts=100, augmentation="...")
    experts = get_experts(splits, spec, device="cuda", experts_dir="~/.cache/ddsuite/experts")
    theta = experts.snapshot(expert=3, epoch=10, device="cuda")   # (num_params,)

A cache entry is a folder named by a key over the dataset (name and fingerprint), the input
space, and every training setting, so a second distillation with the same settings reuses it
and a change to any of them trains new experts. Each expert is one safetensors file holding a
(epochs + 1, num_params) float32 `trajectory`; `experts.json` beside them records the dataset
identity, input space, model spec and parameter layout, augmentation, optimizer, seed, epochs,
library versions and the sha256 of every tensor file. Loading never unpickles, verifies the
checksums, and refuses trajectories made for another dataset, model or input space.
"""

from .store import (
    EXPERTS_FORMAT,
    META_FILE,
    ExpertSpec,
    ExpertTrajectories,
    default_experts_dir,
    expert_key,
    load_experts,
    save_experts,
)
from .train import get_experts, train_experts

__all__ = [
    "EXPERTS_FORMAT",
    "META_FILE",
    "ExpertSpec",
    "ExpertTrajectories",
    "default_experts_dir",
    "expert_key",
    "get_experts",
    "load_experts",
    "save_experts",
    "train_experts",
]
