"""The evaluation protocol: train fresh networks on a set, report their test accuracy."""

from .evaluate import EvaluationResult, ModelScore, check_input_space, evaluate_images, mean_std
from .protocol import EvaluationProtocol
from .trainer import TrainedNetworks, networks_accuracy, train_networks

__all__ = [
    "EvaluationProtocol",
    "EvaluationResult",
    "ModelScore",
    "TrainedNetworks",
    "check_input_space",
    "evaluate_images",
    "mean_std",
    "networks_accuracy",
    "train_networks",
]
