"""Distillers, one file per method (or per family of close variants), registered by name."""

from . import coreset, dm, gradient_matching  # noqa: F401  (registration side effects)
from . import cafe, datadam, idm  # noqa: F401  (distribution-matching family)
from . import trajectory  # noqa: F401
from . import dd, sre2l  # noqa: F401  (unrolled meta-learning, decoupled)
from . import frepo, kip, rfad  # noqa: F401  (kernel family)
from . import haba, idc  # noqa: F401  (parameterised sets)
from .base import METHODS, Distiller, get_method, list_methods, register_method
from .config import MethodConfig, config_from_dict, describe_config

__all__ = [
    "METHODS",
    "Distiller",
    "MethodConfig",
    "config_from_dict",
    "describe_config",
    "get_method",
    "list_methods",
    "register_method",
]
