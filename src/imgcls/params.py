"""Strict parsing of params.yaml into frozen dataclasses.

Every section is checked before a stage does any work: unknown keys (a typo such as ``trian.lr``),
wrong types and out-of-range values raise ``ParamsError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


from .errors import ParamsError


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0  # one seed for random, NumPy, torch and batch order
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self) -> None:
        allowed = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        _require(allowed, "base.device", self.device, "auto, cpu, cuda or cuda:N")
        _require(self.seed >= 0, "base.seed", self.seed, "an integer >= 0")


@dataclass(frozen=True)
class DataParams:
    dataset: Literal["fashion-mnist", "cifar10", "imagefolder"] = "fashion-mnist"
    # A local file or folder, a URL, or a source list (*.txt: one location per line, tried in order).
    source: str = "sources/fashion-mnist.txt"
    limit: int = 0  # keep at most this many train and test images (0 = all); for quick runs and tests
    test_fraction: float = 0.1  # imagefolder without test/: share of train carved out as test
    on_bad_image: Literal["error", "skip"] = "error"
    image_size: int = 32  # imagefolder: images are resized to image_size x image_size
    channels: Literal[1, 3] = 3  # imagefolder: 1 = grayscale, 3 = RGB
    retries: int = 3  # download attempts per URL before moving to the next location
    timeout_s: float = 30.0  # socket timeout per HTTP request
    max_extract_gb: float = 50.0  # archives: most bytes (GiB) one may unpack to

    def validate(self) -> None:
        list_name = Path(self.source).name
        if list_name in ("fashion-mnist.txt", "cifar10.txt") and list_name != f"{self.dataset}.txt":
            raise ParamsError(
                f"params: data.source = {self.source!r} lists {list_name[:-4]} locations but data.dataset = "
                f"{self.dataset!r}; set data.source to sources/{self.dataset}.txt or to your own copy"
            )
        _require(self.source.strip() != "", "data.source", self.source, "a path, a URL or a source list")
        _require(self.limit >= 0, "data.limit", self.limit, "0 (all images) or a positive count")
        _require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "0 < x < 1")
        _require(8 <= self.image_size <= 512, "data.image_size", self.image_size, "8..512")
        _require(1 <= self.retries <= 20, "data.retries", self.retries, "1..20")
        _require(0 < self.timeout_s <= 600, "data.timeout_s", self.timeout_s, "0 < x <= 600")
        _require(0 < self.max_extract_gb <= 10000, "data.max_extract_gb", self.max_extract_gb, "0 < x <= 10000")


@dataclass(frozen=True)
class PreprocessParams:
    val_fraction: float = 0.1  # stratified share of the training set held out for validation

    def validate(self) -> None:
        _require(0 <= self.val_fraction < 1, "preprocess.val_fraction", self.val_fraction, "0 <= x < 1")


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = True  # horizontal flip; the fast recipe alternates it by epoch
    translate: int = 2  # random crop after reflect-padding by this many pixels (0 = off)

    def validate(self) -> None:
        _require(0 <= self.translate <= 8, "train.augment.translate", self.translate, "0..8")


@dataclass(frozen=True)
class TrainParams:
    model: Literal["lenet", "tutorial_cnn", "convnet", "fast"] = "convnet"
    width: int = 32  # channels of the first block; later blocks scale from it (convnet and fast)
    epochs: int = 8
    batch_size: int = 256
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0  # multiplier on lr for BatchNorm biases (airbench uses 64)
    label_smoothing: float = 0.1
    schedule: Literal["constant", "cosine", "linear"] = "linear"
    warmup_epochs: float = 0.5
    ema: float = 0.0  # 0 = off; else decay per step of an exponential moving average of weights
    whiten_bias_epochs: float = 0.0  # fast model: epochs during which the whitening bias trains
    augment: AugmentParams = field(default_factory=AugmentParams)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    log_images: int = 64  # sample images in the TensorBoard grid

    def validate(self) -> None:
        _require(8 <= self.width <= 512, "train.width", self.width, "8..512")
        _require(1 <= self.epochs <= 1000, "train.epochs", self.epochs, "1..1000")
        _require(1 <= self.batch_size <= 65536, "train.batch_size", self.batch_size, "1..65536")
        _require(0 < self.lr <= 10, "train.lr", self.lr, "0 < lr <= 10")
        _require(0 <= self.momentum < 1, "train.momentum", self.momentum, "0 <= x < 1")
        _require(0 <= self.weight_decay < 1, "train.weight_decay", self.weight_decay, "0 <= x < 1")
        _require(0 < self.bias_lr_scale <= 1000, "train.bias_lr_scale", self.bias_lr_scale, "0 < x <= 1000")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "0 <= x < 1")
        _require(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs", self.warmup_epochs,
                 f"0..train.epochs ({self.epochs})")
        _require(0 <= self.ema < 1, "train.ema", self.ema, "0 (off) or 0 < x < 1")
        _require(0 <= self.whiten_bias_epochs <= self.epochs, "train.whiten_bias_epochs",
                 self.whiten_bias_epochs, f"0..train.epochs ({self.epochs})")
        _require(0 <= self.log_images <= 1024, "train.log_images", self.log_images, "0..1024")
        self.augment.validate()


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000
    tta: bool = False  # test-time augmentation: average logits over mirror and one-pixel shifts
    misclassified_images: int = 36  # how many go into the PNG grid

    def validate(self) -> None:
        _require(1 <= self.batch_size <= 65536, "evaluate.batch_size", self.batch_size, "1..65536")
        _require(0 <= self.misclassified_images <= 400, "evaluate.misclassified_images",
                 self.misclassified_images, "0..400")


@dataclass(frozen=True)
class ExportParams:
    parity_images: int = 1000  # test images compared between PyTorch, TorchScript and ONNX Runtime
    parity_atol: float = 1e-4  # max absolute logit difference allowed
    latency_calls: int = 200  # batch-1 calls timed per runtime; the median is reported
    opset: int = 17

    def validate(self) -> None:
        _require(1 <= self.parity_images <= 100000, "export.parity_images", self.parity_images, "1..100000")
        _require(0 < self.parity_atol <= 1, "export.parity_atol", self.parity_atol, "0 < x <= 1")
        _require(200 <= self.latency_calls <= 100000, "export.latency_calls", self.latency_calls,
                 "200..100000 (the median needs enough calls to be stable)")
        _require(13 <= self.opset <= 21, "export.opset", self.opset, "13..21")


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamsError(f"params: {key} = {value!r} is not allowed; expected {allowed}")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check one YAML value against a field type; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if typing.get_origin(tp) is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ParamsError(f"params: {key} = {value!r} has the wrong type; expected {_describe(tp)}")


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "params.yaml"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"params: {where} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ParamsError(
            f"params: unknown key {key!r} (value {raw[unknown[0]]!r}); "
            f"{where} allows: {', '.join(names)}"
        )
    values = {
        name: _convert(raw[name], hints[name], f"{prefix}.{name}" if prefix else name)
        for name in names
        if name in raw
    }
    return cls(**values)


def parse_params(raw: Any) -> Params:
    params = build(Params, raw)
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file (a typo in any section stops every stage)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; run the stage from the project root") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"params: {path} is not valid YAML: {error}") from None
    return parse_params(raw)


def as_dict(params: Any) -> dict:
    """Plain nested dict of a params dataclass (for checkpoints and logs)."""
    return dataclasses.asdict(params)


__all__ = ["ParamsError", "Params", "load_params", "parse_params", "as_dict"]
