"""Load a model for prediction from any file the pipeline writes: the ONNX export (its metadata says
everything predict needs), the TorchScript export (the same facts in an extra file) or a checkpoint.

Every loaded model takes uint8 images (N, C, H, W) at its own input size and returns class probabilities."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..deploy.metadata import METADATA_KEY, TORCHSCRIPT_EXTRA_FILE
from ..errors import UserError


@dataclass
class LoadedModel:
    path: Path
    kind: str  # onnx | torchscript | checkpoint
    class_names: list[str]
    image_size: int
    channels: int
    facts: dict  # everything the file says about itself (data set, test accuracy, ...)
    logits: Callable[[np.ndarray], np.ndarray]  # float32 images in [0, 1] (N, C, H, W) -> logits (N, K)

    def probabilities(self, images_uint8: np.ndarray) -> np.ndarray:
        logits = self.logits(images_uint8.astype(np.float32) / 255)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)


def _check_facts(path: Path, facts: object) -> dict:
    if not isinstance(facts, dict):
        raise UserError(f"{path}: its imgcls metadata is not a JSON object; re-export it (dvc repro -f export)")
    names, size, channels = facts.get("class_names"), facts.get("image_size"), facts.get("channels")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)
            and isinstance(size, int) and size > 0 and channels in (1, 3)):
        raise UserError(f"{path}: its imgcls metadata lacks class_names, image_size or channels "
                        f"(found {sorted(facts)}); re-export it (dvc repro -f export)")
    return facts


def _missing(path: Path) -> UserError:
    return UserError(f"no model at {path}: run `dvc repro` to train and export one, or `dvc pull` to fetch the "
                     "committed run's files from the DVC remote, or pass --model FILE "
                     "(.onnx, .torchscript.pt or checkpoint.pt)")


def load_onnx(path: Path, threads: int) -> LoadedModel:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for any damaged file
        raise UserError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {str(error)[:200]})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in metadata:
        raise UserError(f"{path}: an ONNX model without imgcls metadata (class names, input size); export it with "
                        "this pipeline (dvc repro export) or pass the checkpoint with --model data/model/checkpoint.pt")
    try:
        facts = _check_facts(path, json.loads(metadata[METADATA_KEY]))
    except json.JSONDecodeError:
        raise UserError(f"{path}: its imgcls metadata is not valid JSON; re-export it (dvc repro -f export)") from None
    input_name = session.get_inputs()[0].name

    def logits(images: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: images})[0]

    return LoadedModel(path, "onnx", facts["class_names"], facts["image_size"], facts["channels"], facts, logits)


def load_torchscript(path: Path, threads: int) -> LoadedModel:
    import torch

    torch.set_num_threads(threads)
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except (RuntimeError, ValueError) as error:
        raise UserError(f"{path}: not a loadable TorchScript file ({str(error)[:200]})") from None
    if not extra[TORCHSCRIPT_EXTRA_FILE]:
        raise UserError(f"{path}: a TorchScript file without {TORCHSCRIPT_EXTRA_FILE}; export it with this pipeline")
    facts = _check_facts(path, json.loads(extra[TORCHSCRIPT_EXTRA_FILE]))

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).float().numpy()

    return LoadedModel(path, "torchscript", facts["class_names"], facts["image_size"], facts["channels"], facts,
                       logits)


def load_checkpoint_model(path: Path, threads: int) -> LoadedModel:
    import torch

    from ..model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, checkpoint = load_checkpoint(path, "cpu")
    arguments = checkpoint["arguments"]
    facts = {"class_names": checkpoint["class_names"], "image_size": arguments["image_size"],
             "channels": arguments["in_channels"], "architecture": checkpoint["architecture"]}

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).float().numpy()

    return LoadedModel(path, "checkpoint", facts["class_names"], facts["image_size"], facts["channels"], facts,
                       logits)


def load_model(path: Path, *, threads: int, int8: bool = False) -> LoadedModel:
    """The model in ``path`` (.onnx, TorchScript .pt or a checkpoint .pt); ``int8`` takes the quantized ONNX
    file written beside an fp32 one (model.int8.onnx)."""
    path = Path(path)
    if int8 and not path.name.endswith(".int8.onnx"):
        if path.suffix != ".onnx":
            raise UserError(f"--int8 needs an ONNX model; {path} is not one")
        path = path.with_name(path.name[:-len(".onnx")] + ".int8.onnx")
    if not path.is_file():
        raise _missing(path)
    if path.suffix == ".onnx":
        return load_onnx(path, threads)
    if path.name.endswith(".torchscript.pt"):
        return load_torchscript(path, threads)
    if path.suffix == ".pt":
        return load_checkpoint_model(path, threads)
    raise UserError(f"{path}: not a model file this tool reads (.onnx, .torchscript.pt or checkpoint.pt)")
