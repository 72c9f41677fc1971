"""Self-describing checkpoints: plain state_dict + everything needed to rebuild and use the model.

Only tensors, strings, numbers, lists and dicts are stored, so ``torch.load(..., weights_only=True)``
loads them without unpickling arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_path
from ..params.core import MAX_IMAGE_SIZE
from .registry import MODELS, build_model, is_model, model_spec, normalized_channels

FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel/DDP


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside torch.compile and DataParallel/DistributedDataParallel wrappers."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state_dict on the CPU, with no compile/DDP prefixes."""
    model = unwrap(model)
    state = {}
    for name, tensor in model.state_dict().items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        state[name] = tensor.detach().cpu().clone()
    return state


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    architecture: str,
    arguments: dict[str, Any],
    class_names: list[str],
    mean: list[float],
    std: list[float],
    params: dict,
    extra: dict | None = None,
) -> None:
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": plain_state_dict(model),
        "architecture": architecture,
        "arguments": arguments,  # build_model(architecture, **arguments) rebuilds the network
        "class_names": list(class_names),
        "normalization": {"mean": list(mean), "std": list(std), "input": "float images in [0, 1], (N, C, H, W)"},
        "params": params,
        "extra": extra or {},
    }
    with atomic_path(path, clean_stale=True) as tmp:
        torch.save(payload, tmp)


class ModelArguments(BaseModel):
    """What build_model takes; a checkpoint's arguments are checked against it before anything is built
    (an absurd width would otherwise allocate gigabytes before failing)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    in_channels: Literal[1, 3]
    num_classes: int = Field(ge=2, le=100000)
    image_size: int = Field(ge=1, le=MAX_IMAGE_SIZE)
    mean: list[float]
    std: list[float]
    width: int = Field(default=32, ge=8, le=256)
    whiten_bias_epochs: float = Field(default=0.0, ge=0)


def unusual_tensor(tensor: torch.Tensor) -> str | None:
    """What ``tensor`` is when it is not a plain dense tensor of values (the only kind a state_dict we save
    holds), or None. ``weights_only`` loading admits sparse, quantized, meta and nested tensors, and most
    operations on them (``isfinite``, ``ne``) raise NotImplementedError: ask this before any other."""
    if tensor.layout != torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.is_meta:
        return "a meta tensor (it holds no values)"
    return None


def first_unusual_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """``'<name> is a sparse_coo tensor'`` for the first tensor of ``tensors`` that is not plain, or None."""
    for name, tensor in tensors.items():
        kind = unusual_tensor(tensor)
        if kind:
            return f"{name} is {kind}, not a plain dense one"
    return None


def is_state_dict(value: object) -> bool:
    """Whether ``value`` is a mapping of names to tensors, as ``model.state_dict()`` gives it."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def non_finite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold NaN or infinite values: a model would
    answer NaN for every image, and trained on, they make the first loss NaN. Ask ``first_unusual_tensor``
    first: ``isfinite`` raises on sparse, quantized and meta tensors."""
    return [
        name for name, value in state.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def weights_mismatch(error: RuntimeError, limit: int = 600) -> str:
    """``load_state_dict``'s error (missing or unexpected keys, tensors of other shapes) as one line: its
    list of mismatches, without the "Error(s) in loading state_dict" preamble, cut at ``limit`` characters."""
    return str(error).split("\n\t", 1)[-1].replace("\n\t", "; ")[:limit]


DAMAGED = "it is damaged or was not written by this pipeline. Rebuild it with: dvc repro -f train"


def _bad(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}", advice=DAMAGED)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (safe loading); returns (model in eval mode, checkpoint dict).
    The structure is checked first, so a damaged or foreign file gets a message, not a traceback."""
    checkpoint = _read_checkpoint(path)
    architecture = checkpoint["architecture"]
    arguments = _checked_arguments(path, checkpoint)
    _check_weights(path, checkpoint["state_dict"])
    _check_fit_before_building(path, architecture, arguments, checkpoint["state_dict"])
    model = build_model(architecture, **arguments.model_dump())
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:  # missing or unexpected keys, tensors of the wrong shape
        raise _bad(path, f"its weights do not fit a {architecture} model ({weights_mismatch(error)})") from None
    return model.to(device).eval(), checkpoint


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint file's dict, safely loaded, of this format version and with the keys a model needs."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist", advice="run the train stage first (dvc repro train)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say so instead of a pickle traceback
        raise CheckpointError(f"{path} is not a readable imgcls checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict):
        raise _bad(path, f"expected a dict of model data, found {type(checkpoint).__name__}")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {checkpoint.get('format_version')!r}",
            advice=f"this code reads {FORMAT_VERSION}. Retrain with this version (dvc repro train)",
        )
    missing = [key for key in ("state_dict", "architecture", "arguments", "class_names") if key not in checkpoint]
    if missing:
        raise _bad(path, f"missing {', '.join(missing)}")
    if not isinstance(checkpoint["architecture"], str) or not is_model(checkpoint["architecture"]):
        raise _bad(
            path,
            f"unknown architecture {str(checkpoint['architecture'])[:80]!r} (this code builds {', '.join(MODELS)} "
            "and torchvision's classification networks)",
        )
    return checkpoint


def _checked_arguments(path: Path, checkpoint: dict) -> ModelArguments:
    """The checkpoint's model arguments, checked against what build_model takes, its class names and its
    architecture's needs (normalization channels, minimum image size)."""
    architecture = checkpoint["architecture"]
    try:
        arguments = ModelArguments.model_validate(checkpoint["arguments"])
    except ValidationError as error:
        first = error.errors()[0]
        raise _bad(
            path, f"arguments.{'.'.join(map(str, first['loc']))} = {first.get('input')!r}: {first['msg']}"
        ) from None
    class_names = checkpoint["class_names"]
    if not (
        isinstance(class_names, list)
        and all(isinstance(n, str) for n in class_names)
        and len(class_names) == arguments.num_classes
        and len(set(class_names)) == len(class_names)
    ):
        raise _bad(
            path, f"class_names {class_names!r} do not match the head's {arguments.num_classes} distinct classes"
        )
    channels = normalized_channels(architecture, arguments.in_channels)
    if len(arguments.mean) != channels or len(arguments.std) != channels:
        raise _bad(path, f"mean/std need {channels} value(s), one per channel")
    if arguments.image_size < model_spec(architecture).min_image_size:
        raise _bad(
            path,
            f"{architecture} needs images of at least {model_spec(architecture).min_image_size} pixels, "
            f"arguments say {arguments.image_size}",
        )
    return arguments


def _check_fit_before_building(path: Path, architecture: str, arguments: ModelArguments, state: dict) -> None:
    """The file's tensors against the network's names and shapes, compared on the meta device (no memory): a
    1 KB file naming a 600-million-weight torchvision network is refused before gigabytes are allocated for
    it. regnet_* cannot be built on the meta device (their widths are computed with tensors): the file must
    hold at least half the weights torchvision's published model has."""
    try:
        with torch.device("meta"):
            expected = build_model(architecture, **arguments.model_dump()).state_dict()
    except NotImplementedError:
        from torchvision.models import get_model_weights

        published = get_model_weights(architecture).DEFAULT.meta["num_params"]
        held = sum(tensor.numel() for tensor in state.values())
        if held < published // 2:
            raise _bad(path, f"it holds {held:,} weights, a {architecture} has about {published:,}") from None
        return
    missing = [name for name in expected if name not in state]
    resized = [name for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    unexpected = sorted(set(state) - set(expected))
    problems = [
        f"Missing key(s): {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    ]
    problems = problems if missing else []
    problems += [
        f"size mismatch for {name}: {list(state[name].shape)} in the file, {list(expected[name].shape)} in the model"
        for name in resized[:3]
    ]
    if unexpected:
        problems.append(f"Unexpected key(s): {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    if problems:
        raise _bad(path, f"its weights do not fit a {architecture} model ({'; '.join(problems)})")


def _check_weights(path: Path, state: object) -> None:
    """Plain, finite tensors under names: what a state_dict we save holds."""
    if not is_state_dict(state):
        raise _bad(path, "state_dict is not a mapping of names to tensors")
    unusual = first_unusual_tensor(state)
    if unusual:
        raise _bad(path, f"weight {unusual}")
    broken = non_finite_weights(state)
    if broken:  # a model that would answer NaN for every image
        raise _bad(path, f"weights {broken[:3]} hold NaN or infinite values")
