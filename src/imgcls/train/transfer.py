"""Starting weights for a run: torchvision's ImageNet weights (``train.pretrained``) or a checkpoint this
pipeline wrote (``train.init_from``), loaded into a freshly built model whose head fits this data set.

Both are loaded with ``weights_only=True``. What was loaded (kind, file, sha256, head kept or replaced, the
normalization the weights expect) is returned as provenance: the checkpoint and the exports record it.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, TrainingError
from ..model.checkpoint import (
    first_unusual_tensor,
    is_state_dict,
    load_checkpoint,
    non_finite_weights,
    plain_state_dict,
    weights_mismatch,
)
from ..model.networks import Network
from ..model.registry import model_spec
from ..report import first_of


class TransferError(TrainingError):
    """Starting weights that cannot be used for this run."""


@dataclass
class StartingWeights:
    state: dict[str, torch.Tensor]  # names as in our model's state_dict; the head's left out when it is replaced
    mean: list[float]  # the normalization the weights were trained with: the new model keeps it
    std: list[float]
    head_replaced: bool
    provenance: dict = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def imagenet_weights(architecture: str):
    """torchvision's default ImageNet weights entry for ``architecture`` (URL, hash prefix, transforms)."""
    from torchvision.models import get_model_weights

    return get_model_weights(architecture).DEFAULT


def torch_cache_file(weights) -> Path:
    """Where torch looks for (and downloads) the weights file: $TORCH_HOME/hub/checkpoints/<file name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def _check_trusted(path: Path, expected_prefix: str, trust: bool, advice: str) -> None:
    """A weights file loads when it is torchvision's published one (its sha256 starts with the prefix in the
    file's official name) or when the user trusts it (train.trust_weights_file): checked before it is opened."""
    if trust or file_sha256(path).startswith(expected_prefix):
        return
    raise TransferError(
        f"{path} is not torchvision's published file (its sha256 does not start with {expected_prefix}), "
        f"and a .pth file is a pickle, a format made to run code; {advice}, or set "
        "train.trust_weights_file: true if you trust whoever made it"
    )


def load_pretrained(
    architecture: str, source: str, emit: Callable[[str], None], *, trust: bool = False
) -> StartingWeights:
    """torchvision's ImageNet weights for ``architecture``: ``source`` is ``imagenet`` (torch's cache, else a
    download through torchvision's weights API with its hash check) or the path of the weights file. A file
    that is not torchvision's published one (by sha256) loads only with ``trust``."""
    weights = imagenet_weights(architecture)
    cache_file = torch_cache_file(weights)
    expected_prefix = cache_file.stem.rsplit("-", 1)[-1]  # torchvision names files <name>-<sha256 prefix>.pth
    if source == "imagenet":
        state, path = _imagenet_state(weights, cache_file, expected_prefix, trust, emit)
    else:
        state, path = _file_state(architecture, source, cache_file, expected_prefix, trust)
    _check_pretrained_state(state, source, path)
    sha256 = file_sha256(path)
    official = sha256.startswith(expected_prefix)
    if not official:
        emit(
            f"warning: {path} is not torchvision's published file (its sha256 starts {sha256[:8]}, torchvision's "
            f"{expected_prefix}); using it as {architecture} weights"
        )
    return _pretrained_start(weights, state, path, sha256, official)


def _imagenet_state(
    weights, cache_file: Path, expected_prefix: str, trust: bool, emit: Callable[[str], None]
) -> tuple[object, Path]:
    """torchvision's file from torch's cache (checked first: torch checks the hash of what it downloads, not
    of what it finds in its cache), else downloaded; returns (what it holds, its path)."""
    was_cached = cache_file.is_file()
    if was_cached:
        _check_trusted(cache_file, expected_prefix, trust, "delete it to download torchvision's file afresh")
    emit(f"{weights}: " + (f"from torch's cache {cache_file}" if was_cached else f"downloading {weights.url}"))
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise TransferError(
            f"could not download {weights.url} ({error}). Without a network, copy torchvision's file "
            f"{cache_file.name} into {cache_file.parent}/ (torch's cache; TORCH_HOME moves it) or set "
            "train.pretrained to the file's path"
        ) from None
    except Exception as error:  # a truncated or foreign file in the cache, or a failed hash check
        where = f"the cached file {cache_file}" if was_cached else f"the download of {weights.url}"
        raise TransferError(
            f"{where} is not readable weights ({type(error).__name__}: {str(error)[:300]})",
            advice="delete it and run again to download it afresh",
        ) from None
    return state, cache_file


def _file_state(
    architecture: str, source: str, cache_file: Path, expected_prefix: str, trust: bool
) -> tuple[object, Path]:
    """The weights file the user named (train.pretrained: a path), trusted or torchvision's own, loaded with
    ``weights_only``; returns (what it holds, its path)."""
    path = Path(source)
    if not path.is_file():
        raise TransferError(
            f"train.pretrained = {source!r}: no such file",
            advice=f"name torchvision's {architecture} weights file ({cache_file.name}), or use imagenet or none",
        )
    _check_trusted(path, expected_prefix, trust, f"name torchvision's {architecture} weights file ({cache_file.name})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True), path
    except Exception as error:
        raise TransferError(
            f"train.pretrained = {source!r} is not a readable weights file ({type(error).__name__}: {str(error)[:300]})"
        ) from None


def _check_pretrained_state(state: object, source: str, path: Path) -> None:
    """Plain, finite tensors under names, as torchvision's files hold."""
    if not (is_state_dict(state) and state):
        raise TransferError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    advice = (
        "delete it and run again to download it afresh"
        if source == "imagenet"
        else "it is damaged: name torchvision's file, or use imagenet"
    )
    unusual = first_unusual_tensor(state)
    if unusual:  # torchvision's files hold plain tensors only, and the finiteness check below would raise on it
        raise TransferError(f"train.pretrained = {source!r}: in {path}, weight {unusual}", advice=advice)
    broken = non_finite_weights(state)
    if broken:  # trained on, they make the first loss NaN, and the run would blame train.lr
        raise TransferError(
            f"train.pretrained = {source!r}: {path} holds NaN or infinite weights ({first_of(broken, 3)})",
            advice=advice,
        )


def _pretrained_start(
    weights, state: dict[str, torch.Tensor], path: Path, sha256: str, official: bool
) -> StartingWeights:
    """torchvision's weights under our model's names (``backbone.``), with the normalization they were
    trained with, and where they came from."""
    transforms = weights.transforms()
    normalization = {
        "normalize.mean": torch.tensor(transforms.mean, dtype=torch.float32).view(1, -1, 1, 1),
        "normalize.std": torch.tensor(transforms.std, dtype=torch.float32).view(1, -1, 1, 1),
    }
    return StartingWeights(
        state={**normalization, **{f"backbone.{name}": value for name, value in state.items()}},
        mean=[float(m) for m in transforms.mean],
        std=[float(s) for s in transforms.std],
        head_replaced=True,
        provenance={
            "kind": "pretrained",
            "weights": str(weights),
            "file": str(path),
            "sha256": sha256,
            "official_file": official,
            "head": "replaced",
            "trained_image_size": int(transforms.crop_size[0]),
            "mean": list(transforms.mean),
            "std": list(transforms.std),
        },
    )


def load_init_checkpoint(
    path: str, *, architecture: str, in_channels: int, width: int, class_names: list[str]
) -> StartingWeights:
    """A checkpoint this pipeline wrote, checked like any checkpoint (weights_only, structure, finite weights),
    as starting weights: everything but the head, and the head too when the classes are the same."""
    source_model, checkpoint = _load_init_checkpoint(path)
    _check_init_fits(path, checkpoint, architecture=architecture, in_channels=in_channels, width=width)
    arguments = checkpoint["arguments"]
    same_classes = list(checkpoint["class_names"]) == list(class_names)
    state = plain_state_dict(source_model)
    if not same_classes:
        head = source_model.head_parameter_names() if isinstance(source_model, Network) else set()
        state = {name: value for name, value in state.items() if name not in head}
    return StartingWeights(
        state=state,
        mean=list(arguments["mean"]),
        std=list(arguments["std"]),
        head_replaced=not same_classes,
        provenance={
            "kind": "checkpoint",
            "file": str(path),
            "sha256": file_sha256(Path(path)),
            "dataset": checkpoint.get("params", {}).get("data", {}).get("dataset"),
            "classes": list(checkpoint["class_names"]),
            "head": "replaced" if not same_classes else "kept",
            "image_size": arguments["image_size"],
        },
    )


def _load_init_checkpoint(path: str) -> tuple[torch.nn.Module, dict]:
    """The checkpoint at ``path`` (train.init_from), loaded and checked like any checkpoint."""
    if not Path(path).is_file() and Path(path).resolve() == (Path.cwd() / "data" / "model" / "checkpoint.pt").resolve():
        raise TransferError(
            f"train.init_from = {path!r} is the train stage's own output, which DVC removes before the "
            "stage runs: copy the checkpoint elsewhere first (cp data/model/checkpoint.pt "
            "pretrained.pt) and set train.init_from to the copy"
        )
    try:
        return load_checkpoint(Path(path))
    except CheckpointError as error:  # its advice (retrain the pipeline's own checkpoint) is not for this file
        raise TransferError(
            f"train.init_from: {error.problem}", advice="name a checkpoint.pt this pipeline wrote"
        ) from None


def _check_init_fits(path: str, checkpoint: dict, *, architecture: str, in_channels: int, width: int) -> None:
    """The checkpoint's network is the one this run builds: same architecture, channels and width."""
    source_arch, arguments = checkpoint["architecture"], checkpoint["arguments"]
    if source_arch != architecture:
        raise TransferError(
            f"train.init_from = {path!r} holds a {source_arch} model but train.model is {architecture!r}",
            advice=f"set train.model: {source_arch}",
        )
    if arguments["in_channels"] != in_channels:
        raise TransferError(
            f"train.init_from = {path!r} was trained on {arguments['in_channels']}-channel images, "
            f"this data has {in_channels}",
            advice=f"use data of that many channels (data.channels: {arguments['in_channels']} for an image folder)",
        )
    if model_spec(architecture).takes_width and arguments.get("width", 32) != width:
        raise TransferError(
            f"train.init_from = {path!r} has width {arguments.get('width', 32)}, train.width is {width}",
            advice=f"set train.width: {arguments.get('width', 32)}",
        )


def apply_starting_weights(model: Network, start: StartingWeights, where: str) -> None:
    """Load ``start`` into ``model``: every weight but (when replaced) the head must find its place."""
    head = model.head_parameter_names() if start.head_replaced else set()
    state = {name: value for name, value in start.state.items() if name not in head}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes: another input size for lenet, another network
        raise TransferError(
            f"{where}: its weights do not fit this model ({weights_mismatch(error, limit=500)})",
            advice="lenet and tutorial_cnn layers depend on the image size: use images of the size it was trained "
            "on (data.image_size for an image folder)",
        ) from None
    missing = sorted(set(missing) - head)
    if missing or unexpected:
        raise TransferError(
            f"{where} does not hold this model's weights: missing {missing[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
