"""The evaluation protocol: train fresh networks on a set, report their test accuracy."""

from .evaluate import EvaluationResult, ModelScore, check_input_space, evaluate_images
from .protocol import EvaluationProtocol
from .trainer import TrainedNetworks, test_accuracy, train_networks

__all__ = [
    "EvaluationProtocol",
    "EvaluationResult",
    "ModelScore",
    "TrainedNetworks",
    "check_input_space",
    "evaluate_images",
    "test_accuracy",
    "train_networks",
]
