"""Registry of representations, created by name through one factory.

``representation("efficientnet_lite0:blocks.4")`` or ``representation("alexnet", layer="conv3",
weights="random")`` or ``representation("hog", cell_size=8)``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from ._base import InputLayout, LayerWithoutCode, Representation
from ._geometry import Box, Window

__all__ = [
    "Box",
    "InputLayout",
    "LayerInfo",
    "Representation",
    "Window",
    "available_models",
    "default_input_size",
    "every_layer",
    "layer_table",
    "model_is_grey",
    "model_layers",
    "model_native_size",
    "model_options",
    "register_representation",
    "representation",
]

RepresentationType = TypeVar("RepresentationType", bound=type[Representation])

_REGISTRY: dict[str, type[Representation]] = {}
_FALLBACKS: list[Callable[[str], type[Representation] | None]] = []


def register_representation(name: str) -> Callable[[RepresentationType], RepresentationType]:
    """Class decorator: make a ``Representation`` subclass available to the factory as ``name``."""

    def decorate(cls: RepresentationType) -> RepresentationType:
        cls.model = name
        _REGISTRY[name] = cls
        return cls

    return decorate


#: The module that registers each built-in model. A module is imported when one of its models is
#: first asked for: importing torchvision alone takes ~1.2 s, which Lite0, HOG and SIFT do not need.
_BUILTIN: dict[str, str] = {
    "efficientnet_lite0": "efficientnet",
    "hog": "hog",
    "hogb": "hog",
    "dsift": "dsift",
    "alexnet": "torchvision_models",
    "vgg16": "torchvision_models",
}
_IMPORTED: set[str] = set()


def _load_builtin(module: str | None = None) -> None:
    """Import built-in module ``module`` (all of them with None); importing registers its models."""
    for name in sorted(set(_BUILTIN.values()) if module is None else {module}):
        if name in _IMPORTED:
            continue
        imported = importlib.import_module(f".{name}", __name__)
        _IMPORTED.add(name)
        if name == "torchvision_models":
            _FALLBACKS.append(imported.generic_torchvision_class)


def available_models() -> list[str]:
    """Names the factory accepts (torchvision classification models are accepted too)."""
    _load_builtin()
    return sorted(_REGISTRY)


def _lookup(model: str) -> type[Representation]:
    if model not in _REGISTRY and model in _BUILTIN:
        _load_builtin(_BUILTIN[model])
    if model in _REGISTRY:
        return _REGISTRY[model]
    _load_builtin()  # any other name may be a torchvision model
    if model in _REGISTRY:
        return _REGISTRY[model]
    for fallback in _FALLBACKS:
        cls = fallback(model)
        if cls is not None:
            return cls
    raise ValueError(f"unknown model {model!r}; available: {', '.join(available_models())}")


def model_layers(model: str) -> tuple[str, ...]:
    """Every layer name of ``model``, shallow to deep."""
    return _lookup(model).layers


def model_is_grey(model: str) -> bool:
    """Whether ``model`` sees only brightness (HOG, HOGb, DSIFT), so that its reconstructions are grey."""
    return _lookup(model).grayscale


def model_native_size(model: str) -> int | None:
    """The input size ``model`` was trained at (``None`` for HOG and SIFT, which have none)."""
    return _lookup(model).native_size


def default_input_size(model: str) -> int:
    """The input size used where none is given for tables and shapes: ``model``'s native size, else
    224 (HOG and SIFT, which have none)."""
    return model_native_size(model) or 224


def model_options(model: str) -> tuple[str, ...]:
    """Keyword options ``representation(model, ...)`` accepts (e.g. ``weights``, ``cell_size``)."""
    parameters = inspect.signature(_lookup(model).__init__).parameters
    return tuple(name for name in parameters if name not in ("self", "layer") and not name.startswith("_"))


def every_layer(model: str, **options: Any) -> Iterator[Representation]:
    """``representation(model, layer=…, **options)`` for each layer of ``model``, shallow to deep.
    Networks that can be shared (``build_network``) are built once: one per layer took a minute for
    VGG16's 36 layers."""
    cls = _lookup(model)
    build = getattr(cls, "build_network", None)
    if build is None:
        for layer in cls.layers:
            yield representation(model, layer=layer, **options)
        return
    _check_options(model, options)
    network = build(**options)
    shared: Any = cls  # a torchvision class, whose constructor takes ``_network``
    for layer in cls.layers:
        yield _frozen(shared(layer, **options, _network=network))


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``layer_table``: a layer's code for a square input of ``layer_table``'s size."""

    layer: str
    #: ``(C, H, W)`` or ``(D,)``; None where the layer gives no code (see ``note``).
    code_shape: tuple[int, ...] | None
    #: Input pixels the centre code cell depends on (unclipped where derived from the layer graph);
    #: None for vector codes and layers without a code.
    receptive_field: Box | None
    #: Input pixels between neighbouring code cells; None for vector codes and layers without a code.
    stride: int | None
    #: Why a layer has no code: "does not run in inference" (GoogLeNet's auxiliary heads), "returns a
    #: tuple, not a tensor" (a ViT's attention); empty otherwise.
    note: str = ""


def layer_table(model: str, size: int | None = None, **options: Any) -> list[LayerInfo]:
    """Every layer of ``model``, shallow to deep, with its code shape, the receptive field of its
    centre code cell and its stride for a ``size × size`` input (default: the model's native size,
    else 224); what ``invviz layers`` prints. ``options`` as for ``representation`` (CNNs: pass
    ``weights="random"`` to need no weights; fields measured from the gradient depend on them).

    Layers of a shared torchvision network are measured together (``Representation.measure_layers``:
    one forward pass per image for all of them), others one by one.
    """
    reps = list(every_layer(model, **options))
    size = size or default_input_size(model)
    measured = type(reps[0]).measure_layers(reps, size, size)
    rows = []
    for rep in reps:
        if rep.layer in measured:
            found = measured[rep.layer]
            rows.append(LayerInfo(rep.layer, None, None, None, found) if isinstance(found, str) else LayerInfo(rep.layer, *found))
            continue
        try:
            shape = rep.code_shape(size, size)
        except LayerWithoutCode as error:
            rows.append(LayerInfo(rep.layer, None, None, None, error.short))
            continue
        if not rep.is_spatial:
            rows.append(LayerInfo(rep.layer, shape, None, None))
            continue
        # The centre cell: a corner cell's box is cut by the image where fields are measured.
        box = rep.receptive_field(shape[1] // 2, shape[2] // 2, size, size, clip=False)
        rows.append(LayerInfo(rep.layer, shape, box, rep.stride(size, size)))
    return rows


def parse_spec(spec: str, layer: str | None = None) -> tuple[str, str]:
    """Split ``"model:layer"``; a model with a single layer may omit it."""
    model, _, spec_layer = spec.partition(":")
    if not model:
        raise ValueError(f"representation spec {spec!r} has no model name (expected MODEL:LAYER)")
    if layer is not None and spec_layer and layer != spec_layer:
        raise ValueError(f"layer given twice: {spec_layer!r} in the spec and {layer!r}")
    layers = model_layers(model)
    chosen = layer or spec_layer
    if not chosen:
        if len(layers) != 1:
            raise ValueError(
                f"{model} needs a layer (MODEL:LAYER); valid layers: {', '.join(layers)}"
            )
        chosen = layers[0]
    return model, chosen


def representation(spec: str, layer: str | None = None, **options: Any) -> Representation:
    """Create a representation by name, e.g. ``representation("efficientnet_lite0:blocks.4")``.

    ``options`` go to the representation (``weights=`` for CNNs; ``cell_size=``, ``bin_size=``,
    ``step=`` for HOG and SIFT). The result is in eval mode with frozen parameters.
    """
    model, chosen = parse_spec(spec, layer)
    _check_options(model, options)
    return _frozen(_lookup(model)(chosen, **options))


def _check_options(model: str, options: dict[str, Any]) -> None:
    accepted = model_options(model)
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(
            f"{model} does not take option(s) {', '.join(unknown)}; it takes: {', '.join(accepted) or 'none'}"
        )


def _frozen(rep: Representation) -> Representation:
    """``rep`` in eval mode with frozen parameters, as the factory gives every representation."""
    rep.eval()
    for parameter in rep.parameters():
        parameter.requires_grad_(False)
    return rep
