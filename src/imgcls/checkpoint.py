"""Self-describing checkpoints: plain state_dict + everything needed to rebuild and use the model.

Only tensors, strings, numbers, lists and dicts are stored, so ``torch.load(..., weights_only=True)``
loads them without unpickling arbitrary objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import atomic_path
from .models import build_model

FORMAT_VERSION = 1
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DataParallel/DDP


from .errors import CheckpointError


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state_dict on the CPU, with no compile/DDP prefixes."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    state = {}
    for name, tensor in model.state_dict().items():
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = tensor.detach().cpu().clone()
    return state


def save_checkpoint(path: Path, model: nn.Module, *, architecture: str, arguments: dict[str, Any],
                    class_names: list[str], mean: list[float], std: list[float], params: dict,
                    extra: dict | None = None) -> None:
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
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (safe loading); returns (model in eval mode, checkpoint dict)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist; run the train stage first (dvc repro train)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say so instead of a pickle traceback
        raise CheckpointError(f"{path} is not a readable imgcls checkpoint ({type(error).__name__}: {error})") from None
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {checkpoint.get('format_version')!r}; this code reads {FORMAT_VERSION}. "
            "Retrain with this version (dvc repro train)"
        )
    model = build_model(checkpoint["architecture"], **checkpoint["arguments"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
