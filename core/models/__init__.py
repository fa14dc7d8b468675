"""Networks that distil and evaluate synthetic sets, found by name.

Build any registered model from a spec string; the device is always passed in::

    from ddsuite.core.models import build_model

    net = build_model("convnet(depth=3,norm=batch)", in_channels=3, num_classes=10,
                      image_size=(32, 32), device="cpu")
    feats = net.embed(images)   # (B, net.feature_dim)
    logits = net(images)        # (B, 10) == net.classifier(feats)

Native names: ``convnet`` (+ ``convnet-bn``, ``-ln``, ``-gn``, ``-nn``), ``mlp``, ``lenet``,
``alexnet``, ``alexnet-bn``, ``vgg11``, ``vgg11-bn``, ``resnet18``, ``resnet18-bn``; any
torchvision classification model as ``tv:NAME``. Native models contain no in-place operations
or data-dependent control flow, so they work with `torch.func.functional_call`, `vmap` and
`grad` (BatchNorm in training mode included, when its buffers are stacked and passed in).
"""

# Importing the model modules registers their builders.
from .classic import MLP, VGG11, AlexNet, LeNet
from .convnet import ConvNet
from .registry import (
    EmbeddingNet,
    ModelSpec,
    OptionChecker,
    build_model,
    list_models,
    parse_model_spec,
    register_model,
    split_model_list,
)
from .resnet import ResNet18
from .torchvision_models import TorchvisionNet, list_torchvision_models

__all__ = [
    "MLP",
    "VGG11",
    "AlexNet",
    "ConvNet",
    "EmbeddingNet",
    "LeNet",
    "ModelSpec",
    "OptionChecker",
    "ResNet18",
    "TorchvisionNet",
    "build_model",
    "list_models",
    "list_torchvision_models",
    "parse_model_spec",
    "register_model",
    "split_model_list",
]
