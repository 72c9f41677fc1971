"""The params schema: types, ranges and allowed values of every key in params.yaml. The values themselves
live only in params.yaml (no defaults here): a key missing from the file is an error, not a silent default.

The file is read as YAML 1.2, as DVC reads it (``1e-3`` is a number; a duplicate key is an error). Every
section is checked before a stage does any work: an unknown key (a typo such as ``trian.lr``), a wrong type
or an out-of-range value raises ``ParamsError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ParamsError

DATASET_IMAGE_SIZE = {"fashion-mnist": 28, "cifar10": 32}  # fixed sizes; imagefolder takes data.image_size
# The largest image side anything in the pipeline takes: params, checkpoints and model files alike. A model
# file claiming more is refused before any buffer is sized from it.
MAX_IMAGE_SIZE = 512
# The registered models and the smallest input side (pixels) each one's layers can take. Validation refuses
# smaller inputs before any stage runs; tests/test_models_training.py checks each value against the layers.
MIN_IMAGE_SIZE = {
    "lenet": 16,  # two (5x5 valid conv, 2x2 pool) steps must leave a pixel: 16 -> 12 -> 6 -> 2 -> 1
    "tutorial_cnn": 8,  # three 2x2 pools
    "convnet": 8,  # three 2x2 pools
    "fast": 9,  # the 2x2 valid whitening stem loses a pixel, then three 2x2 pools
    # torchvision's ImageNet networks take any size (adaptive pooling) but halve it five times: at 16 pixels
    # their last two stages see a single pixel, below that more of them would (a floor we set, not a layer's
    # limit). Their ImageNet weights were trained on 224-pixel crops: larger images suit them better.
    "resnet18": 16,
    "mobilenet_v3_small": 16,
}
TORCHVISION_MODELS = ("resnet18", "mobilenet_v3_small")  # built by torchvision; train.pretrained applies to them
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # https://, file://, s3://: train paths are never URLs


class Section(BaseModel):
    # strict: no "3" -> 3 or 1 -> True coercion; ints are still accepted where numbers (floats) are expected.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BaseParams(Section):
    seed: int = Field(ge=0, le=2**32 - 1)  # random, NumPy (which takes at most 2^32 - 1), torch, batch order
    device: str = Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda or cuda:N")
    threads: int = Field(ge=0, le=1024)  # torch's intra-op threads; 0 = one per core


class DataParams(Section):
    dataset: Literal["fashion-mnist", "cifar10", "imagefolder"]
    source: str = Field(min_length=1, description="a path, a URL or a source list (.txt)")
    limit: int = Field(ge=0)  # at most this many train and test images (0 = all)
    test_fraction: float = Field(gt=0, lt=1)
    on_bad_image: Literal["error", "skip"]
    image_size: int = Field(ge=8, le=MAX_IMAGE_SIZE)
    channels: Literal[1, 3]
    # Pillow itself refuses images of more than 178,956,970 pixels (its decompression-bomb limit).
    max_image_pixels: int = Field(ge=1024, le=178_956_970)
    # imagefolder with train/ and val/ but no test/: val/ is the test split (test) or the validation split (val)
    val_folder: Literal["test", "val"]
    retries: int = Field(ge=1, le=20)
    timeout_s: float = Field(gt=0, le=600)
    max_extract_gb: float = Field(gt=0, le=10000)


class PreprocessParams(Section):
    val_fraction: float = Field(ge=0, lt=1)


class AugmentParams(Section):
    flip: bool
    alternate_flip: bool  # flip a fixed random half in even epochs, the other half in odd ones (airbench)
    translate: int = Field(ge=0, le=8)


class TrainParams(Section):
    model: Literal["lenet", "tutorial_cnn", "convnet", "fast", "resnet18", "mobilenet_v3_small"]
    # none | imagenet (torchvision's weights: torch's cache, else downloaded) | path to torchvision's .pth file
    pretrained: str = Field(min_length=1, description="none, imagenet or the path of a torchvision weights file")
    init_from: str = Field(min_length=1, description="none or the path of a checkpoint.pt this pipeline wrote")
    # Checkpoints and .pth files are pickles: torch reads them with its restricted weights_only loader, but the
    # format was made to run code, so a file that is not torchvision's published one loads only when trusted.
    trust_weights_file: bool
    backbone_lr_scale: float = Field(gt=0, le=1)  # rate multiplier for loaded (pretrained) weights
    freeze_backbone_epochs: int = Field(ge=0, le=1000)  # loaded weights stay fixed this many epochs
    width: int = Field(ge=8, le=256)
    epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=65536)
    min_batches_per_epoch: int = Field(ge=1, le=10000)  # the batch is cut so an epoch has at least this many
    min_steps: int = Field(ge=0, le=1000000)  # epochs are raised so the run has at least this many steps
    optimizer: Literal["sgd", "adamw"]
    lr: float = Field(gt=0, le=10)
    momentum: float = Field(ge=0, lt=1)
    nesterov: bool
    weight_decay: float = Field(ge=0, lt=1)
    bias_lr_scale: float = Field(gt=0, le=1000)
    label_smoothing: float = Field(ge=0, lt=1)
    schedule: Literal["constant", "cosine", "linear"]
    warmup_epochs: float = Field(ge=0, le=1000)  # a warm-up longer than the run ends with the run
    ema: float = Field(ge=0, lt=1)
    whiten_bias_epochs: float = Field(ge=0, le=1000)  # longer than the run: the bias trains throughout
    augment: AugmentParams
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    log_images: int = Field(ge=0, le=1024)
    in_memory: Literal["auto", "always", "never"]
    processes: int = Field(ge=1, le=256)  # data-parallel processes on this machine (torchrun); 1 = one plain process
    sync_batchnorm: bool  # with several processes on CUDA: BatchNorm statistics over the whole global batch


class EvaluateParams(Section):
    batch_size: int = Field(ge=1, le=65536)
    tta: bool
    misclassified_images: int = Field(ge=0, le=400)


class ExportParams(Section):
    parity_images: int = Field(ge=1, le=100000)
    parity_atol: float = Field(gt=0, le=1)
    latency_calls: int = Field(
        ge=200, le=100000, description="200..100000 (the median needs enough calls to be stable)"
    )
    opset: int = Field(ge=13, le=21)
    tta: bool
    int8_max_drop: float = Field(ge=0, le=100, description="0..100 (percentage points of test accuracy)")
    int8_calibration_images: int = Field(ge=1, le=100000)


class Params(Section):
    base: BaseParams
    data: DataParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams


def input_size(data: DataParams) -> int:
    """The side of the images the model will see."""
    return DATASET_IMAGE_SIZE.get(data.dataset, data.image_size)


def _check_combinations(params: Params) -> None:
    """Rules across keys: every value that passes is one the stages can run."""
    data = params.data
    list_name = Path(data.source).name
    if list_name in ("fashion-mnist.txt", "cifar10.txt") and list_name != f"{data.dataset}.txt":
        raise ParamsError(
            f"params: data.source = {_show(data.source)} lists {list_name[:-4]} locations but data.dataset = "
            f"{data.dataset!r}; set data.source to sources/{data.dataset}.txt or to your own copy"
        )
    train = params.train
    for key in ("pretrained", "init_from"):
        value = getattr(train, key)
        if URL_SCHEME.match(value):  # a path is opened as given: "https://x" would become the folder "https:/x"
            raise ParamsError(
                f"params: train.{key} = {_show(value)} is a URL, but it takes a file's path: download "
                f"the file (curl -LO <URL>) and set train.{key} to where it is"
            )
    if train.pretrained != "none" and train.model not in TORCHVISION_MODELS:
        raise ParamsError(
            f"params: train.pretrained = {_show(train.pretrained)} loads torchvision's ImageNet weights, "
            f"which exist for {', '.join(TORCHVISION_MODELS)}, not for train.model = {train.model!r}; set "
            "train.pretrained: none, or start from a checkpoint of your own with train.init_from"
        )
    if train.pretrained != "none" and train.init_from != "none":
        raise ParamsError("params: train.pretrained and train.init_from both name starting weights; set one to none")
    if train.init_from != "none" and not train.trust_weights_file:
        raise ParamsError(
            f"params: train.init_from = {_show(train.init_from)} names a checkpoint, a pickle-format file "
            "(read through torch's restricted weights_only loader, but pickle is a format made to run "
            "code); set train.trust_weights_file: true if you or someone you trust wrote it"
        )
    if train.freeze_backbone_epochs and train.pretrained == "none" and train.init_from == "none":
        raise ParamsError(
            f"params: train.freeze_backbone_epochs = {train.freeze_backbone_epochs} freezes weights loaded "
            "by train.pretrained or train.init_from, and both are none; set it to 0 or name the weights"
        )
    if train.processes > 1 and ":" in params.base.device:
        raise ParamsError(
            f"params: base.device = {params.base.device!r} names one GPU, but train.processes = "
            f"{train.processes} gives each process the GPU of its local rank; set base.device: cuda or auto"
        )
    size, smallest = input_size(data), MIN_IMAGE_SIZE[params.train.model]
    if size < smallest:
        where = "data.image_size" if data.dataset == "imagefolder" else f"{data.dataset}'s image size"
        raise ParamsError(
            f"params: train.model = {params.train.model!r} needs images of at least {smallest}x{smallest} "
            f"pixels, but {where} is {size}; raise data.image_size or choose another train.model"
        )


def _allowed(field_info: Any) -> str:
    """The rule a field's value broke, from its description or its bounds: "8..512", "0 < x <= 10"."""
    if field_info.description:
        return field_info.description
    bounds = {}
    for item in field_info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    if "ge" in bounds and "le" in bounds and field_info.annotation is int:
        return f"{bounds['ge']}..{bounds['le']}"
    lower = f"{bounds['ge']} <= " if "ge" in bounds else f"{bounds['gt']} < " if "gt" in bounds else ""
    upper = f" <= {bounds['le']}" if "le" in bounds else f" < {bounds['lt']}" if "lt" in bounds else ""
    return f"{lower}x{upper}" if lower or upper else str(field_info.annotation)


def _field_info(loc: tuple) -> Any:
    model: Any = Params
    info = None
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) and isinstance(model, type) else None
        if info is None:
            return None
        model = info.annotation
    return info


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxdict, _SHORT_REPR.maxlist = 2, 4, 4
_SHORT_REPR.maxstring, _SHORT_REPR.maxother = 80, 80

TYPE_NAMES = {
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a mapping of keys to values",
    "dict_type": "a mapping",
}


def _describe(error: dict, raw: Any) -> str:
    loc = error["loc"]
    key = ".".join(str(part) for part in loc)
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _field_info(loc[:-1]).annotation if len(loc) > 1 else Params
        return (
            f"params: unknown key {key!r} (value {_show(value)}); {'.'.join(map(str, loc[:-1])) or 'params.yaml'} "
            f"allows: {', '.join(parent.model_fields)}"
        )
    if kind == "missing":
        return f"params: {key} is missing; params.yaml must set it (every key has its value there)"
    if kind in TYPE_NAMES:
        return f"params: {key} = {_show(value)} has the wrong type; expected {TYPE_NAMES[kind]}"
    if kind == "literal_error":
        return f"params: {key} = {_show(value)} is not allowed; expected one of {error['ctx']['expected']}"
    info = _field_info(loc)
    allowed = _allowed(info) if info is not None else error["msg"]
    return f"params: {key} = {_show(value)} is not allowed; expected {allowed}"


def _show(value: Any) -> str:
    """A value for a message, cut short: YAML aliases can make a small file hold an enormous structure."""
    return _SHORT_REPR.repr(value)


def _check_keys(raw: dict, prefix: str = "", seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if id(raw) in seen:  # a mapping reached again through a YAML alias: checked once, not once per path
        return
    seen.add(id(raw))
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ParamsError(
                f"params: key {_show(key)} in {prefix.rstrip('.') or 'params.yaml'} is not a name; "
                "keys are words such as train or lr"
            )
        if isinstance(value, dict):
            _check_keys(value, f"{prefix}{key}.", seen)


def parse_params(raw: Any) -> Params:
    """Validate the parsed params file; the first problem raises ParamsError naming key, value and rule."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params: params.yaml must be a mapping of sections to keys, got {_show(raw)}")
    try:
        _check_keys(raw)
    except RecursionError:
        raise ParamsError("params: params.yaml nests mappings thousands deep; it is not a params file") from None
    try:
        params = Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(_describe(error.errors()[0], raw)) from None
    _check_combinations(params)
    return params


def read_yaml(path: Path) -> Any:
    """YAML 1.2 as DVC reads it: ``1e-3`` is a number, ``yes`` a string, and a duplicate key an error."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; run the stage from the project root") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ParamsError(
            f"params: {path} is not a UTF-8 text file ({type(error).__name__}); save it as UTF-8"
        ) from None
    except (RecursionError, ValueError) as error:  # nesting thousands deep, integers of thousands of digits
        raise ParamsError(
            f"params: {path} cannot be read as params ({type(error).__name__}: {_show(str(error))})"
        ) from None
    except YAMLError as error:
        problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ParamsError(f"params: {path} is not valid YAML: {problem or error}{where}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole params file (a typo in any section stops every stage)."""
    return parse_params(read_yaml(Path(path)))


def as_dict(params: BaseModel) -> dict:
    """Plain nested dict of params (for checkpoints and logs)."""
    return params.model_dump()
