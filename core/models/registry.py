"""The model registry: spec strings, option checks and `build_model`.

A model is named by a spec string such as ``convnet`` or
``convnet(depth=4,width=64,norm=batch)``. `parse_model_spec` turns the text into a `ModelSpec`;
`build_model` looks the name up, checks the options against the builder's keyword arguments
and builds the network on the device the caller passes in.

Builders are registered with `register_model` and take keyword-only arguments::

    @register_model("tiny")
    def tiny(*, in_channels, num_classes, image_size, width=16):
        ...

Every built model follows the `EmbeddingNet` contract: ``embed(x)`` returns ``(B, feature_dim)``
features and ``forward(x) == classifier(embed(x))``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, UnknownNameError
from ..registry import Registry

__all__ = [
    "EmbeddingNet",
    "ModelSpec",
    "OptionChecker",
    "TV_PREFIX",
    "build_model",
    "list_models",
    "parse_model_spec",
    "register_model",
    "register_norm_variant",
    "split_model_list",
]

logger = logging.getLogger(__name__)

TV_PREFIX = "tv:"
"""Spec names starting with this prefix are torchvision classification models."""

OptionValue = int | float | str | bool
ModelBuilder = Callable[..., nn.Module]

_MODELS: Registry[ModelBuilder] = Registry("model")

# The arguments `build_model` passes itself; a spec may not set them.
_RESERVED = ("in_channels", "num_classes", "image_size")

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_.\-]*(:[a-z_][a-z0-9_.\-]*)?$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_STR_FORBIDDEN = set("(),= \t\n")

_GRAMMAR = "NAME or NAME(key=value,...) with int, float, true/false or bare-word values"


class EmbeddingNet(nn.Module):
    """Base class of the native models: a feature extractor followed by a linear classifier.

    Subclasses set `classifier` and `feature_dim` and implement `embed`.

    Attributes:
        feature_dim: width of the features that `embed` returns.
        classifier: the final layer, mapping ``(B, feature_dim)`` to ``(B, num_classes)``.
    """

    feature_dim: int
    classifier: nn.Module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the features before the classifier, shape ``(B, feature_dim)``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement embed()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``classifier(embed(x))``, shape ``(B, num_classes)``."""
        return self.classifier(self.embed(x))  # (B, num_classes)


@dataclass(frozen=True)
class ModelSpec:
    """A model name with its options, as written in a spec string.

    Options are kept as a tuple of ``(key, value)`` pairs sorted by key, so two specs that differ
    only in the order their options were written compare equal. A mapping is accepted too.

    Args:
        name: registered model name, or ``tv:NAME`` for a torchvision model (lower-cased).
        options: keyword options for the builder; values are int, float, bool or str.

    Example:
        >>> spec = parse_model_spec("convnet(width=64,depth=4)")
        >>> str(spec)
        'convnet(depth=4,width=64)'
        >>> parse_model_spec(str(spec)) == spec
        True
    """

    name: str
    options: tuple[tuple[str, OptionValue], ...] | Mapping[str, OptionValue] = ()

    def __post_init__(self) -> None:
        name = self.name.strip().lower() if isinstance(self.name, str) else self.name
        pairs = self.options.items() if isinstance(self.options, Mapping) else self.options
        pairs = tuple((str(key), value) for key, value in pairs)

        problems = []
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append(f"model name {self.name!r} is not a valid name; expected {_GRAMMAR}")
        keys = [key for key, _ in pairs]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            problems.append(f"option {key!r} is given more than once")
        for key, value in pairs:
            problems.extend(_check_option_text(key, value))
        if problems:
            raise ConfigError(problems, source=f"model spec {self.name!r}")

        object.__setattr__(self, "name", name)
        object.__setattr__(self, "options", tuple(sorted(pairs, key=lambda kv: kv[0])))

    @property
    def kwargs(self) -> dict[str, OptionValue]:
        """The options as a dict, ready to pass to a builder."""
        return dict(self.options)

    @property
    def is_torchvision(self) -> bool:
        """Whether the name refers to a torchvision model (``tv:NAME``)."""
        return self.name.startswith(TV_PREFIX)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{key}={_format_value(value)}" for key, value in self.options)
        return f"{self.name}({body})"


def _check_option_text(key: str, value: object) -> list[str]:
    """Problems that would stop an option from round-tripping through a spec string."""
    problems = []
    if not _KEY_RE.match(key):
        problems.append(f"option name {key!r} is not an identifier")
    if isinstance(value, str):
        if not value or _STR_FORBIDDEN & set(value):
            problems.append(
                f"option {key}={value!r}: text values must be non-empty and contain none of "
                "'(),=' or whitespace"
            )
        elif _FLOAT_RE.match(value) or value.lower() in ("true", "false"):
            problems.append(
                f"option {key}={value!r}: a text value that reads as a number or a boolean "
                "would not round-trip; pass the number or boolean itself"
            )
    elif not isinstance(value, (bool, int, float)):
        problems.append(
            f"option {key}={value!r} has type {type(value).__name__}; allowed: int, float, "
            "bool, str"
        )
    return problems


def _format_value(value: OptionValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _parse_value(text: str) -> OptionValue:
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_model_spec(text: str | ModelSpec) -> ModelSpec:
    """Parse ``NAME`` or ``NAME(key=value,...)`` into a `ModelSpec`.

    Values that read as integers become `int`, other numbers `float`, ``true``/``false``
    become `bool`, and anything else stays a `str` (e.g. ``norm=batch``). Whitespace around
    tokens is ignored. Whether the name is registered is checked by `build_model`, not here.

    Args:
        text: the spec string; a `ModelSpec` is returned unchanged.

    Returns:
        The parsed spec.

    Raises:
        ConfigError: the text does not follow the grammar (the message shows what was received).
    """
    if isinstance(text, ModelSpec):
        return text
    if not isinstance(text, str):
        raise ConfigError([f"a model spec must be a string, got {type(text).__name__}"])
    stripped = text.strip()
    source = f"model spec {text!r}"
    if "(" not in stripped:
        if ")" in stripped or "," in stripped or "=" in stripped:
            raise ConfigError([f"expected {_GRAMMAR}"], source=source)
        return ModelSpec(stripped)

    name, _, rest = stripped.partition("(")
    if not rest.endswith(")") or "(" in rest or ")" in rest[:-1]:
        raise ConfigError(
            [f"unbalanced or nested parentheses; expected {_GRAMMAR}"], source=source
        )
    body = rest[:-1].strip()
    pairs: list[tuple[str, OptionValue]] = []
    problems = []
    for item in body.split(",") if body else []:
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            problems.append(f"option {item.strip()!r} is not of the form key=value")
            continue
        pairs.append((key, _parse_value(value)))
    if problems:
        raise ConfigError(problems, source=source)
    return ModelSpec(name.strip(), tuple(pairs))


def split_model_list(text: str) -> list[str]:
    """Split a comma-separated list of model specs on its top-level commas only.

    Args:
        text: e.g. ``"convnet(depth=4,width=64),mlp"``.

    Returns:
        The stripped spec strings, e.g. ``["convnet(depth=4,width=64)", "mlp"]``.

    Raises:
        ConfigError: unbalanced parentheses or an empty entry (e.g. ``"convnet,,mlp"``).
    """
    items: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                break
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    if depth != 0:
        raise ConfigError(
            ["unbalanced parentheses; expected specs like convnet(depth=4,width=64),mlp"],
            source=f"model list {text!r}",
        )
    items.append(text[start:].strip())
    if any(not item for item in items):
        raise ConfigError(
            [f"empty entry in the comma-separated list (entries: {items})"],
            source=f"model list {text!r}",
        )
    return items


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model builder under `name` (a decorator).

    The builder is called as ``fn(*, in_channels, num_classes, image_size, **options)`` and must
    return an `nn.Module` with ``embed(x) -> (B, feature_dim)`` and an int ``feature_dim``.
    The options it accepts are its other keyword arguments; unknown options in a spec are
    refused before it is called. A builder that takes ``**kwargs`` receives every option.

    Args:
        name: the spec name; lower-case letters, digits, ``_``, ``-`` and ``.``. Names
            starting with ``tv:`` are reserved for torchvision models.

    Raises:
        DuplicateNameError: the name is taken.
        ConfigError: the name is not a valid spec name or uses the ``tv:`` prefix.
    """
    key = name.lower()
    if key.startswith(TV_PREFIX) or ":" in key or not _NAME_RE.match(key):
        raise ConfigError(
            [f"cannot register model name {name!r}: use lower-case letters, digits, '_', '-' "
             f"or '.' (the prefix {TV_PREFIX!r} is reserved for torchvision models)"]
        )

    def add(fn: ModelBuilder) -> ModelBuilder:
        _MODELS.register(key, fn)
        return fn

    return add


def list_models() -> list[str]:
    """The registered native names, then the pattern ``tv:<torchvision name>``."""
    return [*_MODELS.names(), f"{TV_PREFIX}<torchvision name>"]


def build_model(
    spec: str | ModelSpec,
    *,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    device: torch.device | str,
) -> nn.Module:
    """Build the model named by `spec` for the given input and classes, on `device`.

    Args:
        spec: a spec string (``"convnet(depth=4)"``, ``"tv:resnet18"``) or a `ModelSpec`.
        in_channels: channels of the input images.
        num_classes: number of outputs of the classifier.
        image_size: ``(height, width)`` of the input images.
        device: where the parameters and buffers are created.

    Returns:
        The model, in training mode, with ``embed`` and ``feature_dim``.

    Raises:
        UnknownNameError: the name is not registered (the message lists every valid name).
        ConfigError: an unknown option, a bad value, or sizes the architecture cannot take.
        UnsupportedFeatureError: a torchvision model whose classifier cannot be located.
    """
    spec = parse_model_spec(spec)
    in_channels, num_classes, image_size = _check_sizes(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )
    device = torch.device(device)

    if spec.is_torchvision:
        from .torchvision_models import build_torchvision_model

        builder = functools.partial(build_torchvision_model, spec.name[len(TV_PREFIX):])
    elif spec.name in _MODELS:
        builder = _MODELS.get(spec.name)
    else:
        raise UnknownNameError("model", spec.name, list_models())
    _check_option_names(spec, builder)

    with device:  # factory calls inside the builder allocate on `device` directly
        model = builder(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size,
            **spec.kwargs,
        )
    model = model.to(device)
    _check_contract(spec, model)
    logger.debug("built %s (feature_dim=%d) on %s", spec, model.feature_dim, device)
    return model


def _as_int(value: object) -> int | None:
    """`value` as an int if it is an integer (Python, NumPy or 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _check_sizes(
    *, in_channels: object, num_classes: object, image_size: object
) -> tuple[int, int, tuple[int, int]]:
    """Validate the sizes `build_model` receives and return them as plain ints."""
    problems = []
    channels, classes = _as_int(in_channels), _as_int(num_classes)
    if channels is None or channels < 1:
        problems.append(f"in_channels must be an integer >= 1, got {in_channels!r}")
    if classes is None or classes < 1:
        problems.append(f"num_classes must be an integer >= 1, got {num_classes!r}")
    sides = [_as_int(s) for s in image_size] if isinstance(image_size, (tuple, list)) else []
    if len(sides) != 2 or any(s is None or s < 1 for s in sides):
        problems.append(
            f"image_size must be (height, width) with integers >= 1, got {image_size!r}"
        )
    if problems:
        raise ConfigError(problems, source="build_model")
    return channels, classes, (sides[0], sides[1])  # type: ignore[return-value]


def _check_option_names(spec: ModelSpec, builder: ModelBuilder) -> None:
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        allowed = None
    else:
        allowed = sorted(
            p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED
        )
    problems = []
    for key, value in spec.options:
        if key in _RESERVED:
            problems.append(f"option {key}={value!r} is set by build_model, not by the spec")
        elif allowed is not None and key not in allowed:
            problems.append(
                f"unknown option {key}={value!r} for model {spec.name!r}; allowed options: "
                f"{', '.join(allowed) or '(none)'}"
            )
    if problems:
        raise ConfigError(problems, source=f"model spec {str(spec)!r}")


def _check_contract(spec: ModelSpec, model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"the builder of {spec.name!r} returned {type(model).__name__}, not an nn.Module"
        )
    feature_dim = getattr(model, "feature_dim", None)
    if not callable(getattr(model, "embed", None)) or not isinstance(feature_dim, int):
        raise TypeError(
            f"the builder of {spec.name!r} returned a module without embed(x) and an int "
            "feature_dim; every model must provide both"
        )


class OptionChecker:
    """Collects every problem with a builder's options, then raises them together.

    Args:
        model: the model name, used in messages.

    Example:
        >>> check = OptionChecker("convnet")
        >>> depth = check.integer("depth", 3, minimum=1)
        >>> norm = check.choice("norm", "batch", ("none", "batch"))
        >>> check.done()
    """

    def __init__(self, model: str):
        self.model = model
        self.problems: list[str] = []

    def integer(self, option: str, value: object, *, minimum: int) -> int:
        """Return `value` if it is an int >= `minimum`; otherwise record a problem."""
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problems.append(
                f"{option}={value!r} for {self.model}; allowed: an integer >= {minimum}"
            )
            return minimum
        return value

    def choice(self, option: str, value: object, allowed: Iterable[str]) -> str:
        """Return `value` lower-cased if it is one of `allowed`; otherwise record a problem."""
        allowed = tuple(allowed)
        text = value.lower() if isinstance(value, str) else value
        if text not in allowed:
            self.problems.append(
                f"{option}={value!r} for {self.model}; allowed: {', '.join(allowed)}"
            )
            return allowed[0]
        return text

    def add(self, problem: str) -> None:
        """Record a problem found by the builder itself."""
        self.problems.append(problem)

    def done(self) -> None:
        """Raise `ConfigError` with every recorded problem, if any."""
        if self.problems:
            raise ConfigError(self.problems, source=f"model {self.model!r}")


def register_norm_variant(name: str, cls: type[EmbeddingNet], default_norm: str) -> None:
    """Register `name` as `cls` whose only option is `norm`, defaulting to `default_norm`.

    `cls` takes `in_channels`, `num_classes`, `image_size` and `norm` as keywords.
    """

    def build(
        *, in_channels: int, num_classes: int, image_size: tuple[int, int],
        norm: str = default_norm,
    ) -> EmbeddingNet:
        from .norm import NORMS

        check = OptionChecker(name)
        norm = check.choice("norm", norm, NORMS)
        check.done()
        return cls(
            in_channels=in_channels, num_classes=num_classes, image_size=image_size, norm=norm
        )

    build.__name__ = build.__qualname__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = f"Build ``{name}``: {cls.__name__} with norm={default_norm} by default."
    register_model(name)(build)
