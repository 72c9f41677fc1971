import subprocess
import sys

import pytest
from conftest import REPO_ROOT, committed_params_raw, merge, real_params
from pydantic import BaseModel

from imgcls.errors import ParamsError
from imgcls.params.project import Params, load_params, parse_params
from imgcls.params.train import params_with_recipe


def test_committed_params_parse():
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params.evaluate.batch_size, int) and isinstance(params.train.augment.mixup, float)
    assert params.train.weight_decay == "auto"  # the model's recipe
    resolved = params_with_recipe(params).train
    assert isinstance(resolved.weight_decay, float) and isinstance(resolved.augment.translate, int)


def required_everywhere(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys of the schema that carry a default (there must be none: params.yaml is the one home of values)."""
    found = []
    for name, info in model.model_fields.items():
        if not info.is_required():
            found.append(prefix + name)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            found += required_everywhere(info.annotation, f"{prefix}{name}.")
    return found


def test_the_schema_holds_no_defaults_so_params_yaml_is_the_one_home_of_values():
    assert required_everywhere(Params) == []
    raw = committed_params_raw()
    del raw["train"]["lr"]
    with pytest.raises(ParamsError, match="params: train.lr is missing; params.yaml must set it"):
        parse_params(raw)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"trian": {"lr": 1}}, "unknown key 'trian' (value {'lr': 1}); params.yaml allows: base, data"),
        ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr' (value 0.1); train allows: model, pretrained"),
        ({"train": {"lr": "fast"}}, "train.lr = 'fast' has the wrong type; expected auto or a number"),
        ({"train": {"epochs": 2.5}}, "train.epochs = 2.5 has the wrong type; expected an integer"),
        ({"train": {"epochs": True}}, "train.epochs = True has the wrong type; expected an integer"),
        ({"train": {"lr": -1}}, "train.lr = -1 is not allowed; expected auto or 0 < x <= 10"),
        ({"train": {"width": 100000}}, "train.width = 100000 is not allowed; expected 8..256"),
        ({"train": {"model": "resnet9000"}}, "train.model = 'resnet9000' is not allowed; expected one of 'lenet'"),
        (
            {"train": {"augment": {"flip": "yes"}}},
            "train.augment.flip = 'yes' has the wrong type; expected true or false",
        ),
        ({"preprocess": {"val_fraction": 1.5}}, "preprocess.val_fraction = 1.5 is not allowed; expected 0 <= x < 1"),
        ({"data": {"dataset": "mnist"}}, "data.dataset = 'mnist' is not allowed"),
        ({"base": {"device": "tpu"}}, "base.device = 'tpu' is not allowed; expected auto, cpu, cuda or cuda:N"),
        ({"base": {"seed": 4294967296}}, "base.seed = 4294967296 is not allowed; expected 0..4294967295"),
        ({"base": {"seed": -1}}, "base.seed = -1 is not allowed"),
        ({1: {"x": 1}}, "key 1 in params.yaml is not a name"),
        ({"train": {2: 0.1}}, "key 2 in train is not a name"),
        ({"data": {"source": "sources/cifar10.txt"}}, "lists cifar10 locations but data.dataset = 'fashion-mnist'"),
        (
            {"train": {"pretrained": "imagenet"}},
            "train.pretrained = 'imagenet' loads torchvision's ImageNet weights, "
            "which exist for torchvision's networks (resnet18, mobilenet_v3_small, ...), "
            "not for train.model = 'fast_lite'",
        ),
        (
            {"train": {"model": "resnet18", "pretrained": "imagenet", "init_from": "a.pt"}},
            "train.pretrained and train.init_from both name starting weights",
        ),
        ({"train": {"freeze_backbone_epochs": 2}}, "train.freeze_backbone_epochs = 2 freezes weights loaded"),
        ({"train": {"backbone_lr_scale": 0}}, "train.backbone_lr_scale = 0 is not allowed; expected 0 < x <= 1"),
        ({"train": {"init_from": ""}}, "train.init_from = '' is not allowed; expected none or the path"),
        ({"train": {"processes": 0}}, "train.processes = 0 is not allowed; expected 1..256"),
        (
            {"train": {"processes": 2}, "base": {"device": "cuda:1"}},
            "base.device = 'cuda:1' names one GPU, but "
            "train.processes = 2 gives each process the GPU of its local rank",
        ),
        (
            {"data": {"val_folder": "validation"}},
            "data.val_folder = 'validation' is not allowed; expected one of 'test'",
        ),
        (
            {"data": {"dataset": "imagefolder", "source": "x.zip", "image_size": 8}},
            "train.model = 'fast_lite' needs images of at least 9x9 pixels, but data.image_size is 8",
        ),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(change, fragment):
    with pytest.raises(ParamsError) as caught:
        parse_params(merge(committed_params_raw(), change))
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "given, level", [(True, "mirror_shifts"), (False, "none"), ("mirror", "mirror"), ("none", "none")]
)
def test_tta_takes_a_level_or_the_old_true_and_false(given, level):
    params = parse_params(merge(committed_params_raw(), {"evaluate": {"tta": given}, "export": {"tta": given}}))
    assert params.evaluate.tta == level and params.export.tta == level


def test_tta_levels_of_params_are_the_networks_levels():
    import typing

    from imgcls.model.networks import TTA_LEVELS
    from imgcls.params.core import TTALevel

    assert set(typing.get_args(typing.get_args(TTALevel)[0])) == set(TTA_LEVELS)
    with pytest.raises(ParamsError) as caught:
        parse_params(merge(committed_params_raw(), {"evaluate": {"tta": "shifts"}}))
    assert "evaluate.tta = 'shifts' is not allowed" in str(caught.value) and "mirror_shifts" in str(caught.value)


def write_params(tmp_path, text_edit):
    text = (REPO_ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_text(text_edit(text))
    return path


def test_yaml_1_2_numbers_are_numbers_as_dvc_reads_them(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as the string '1e-3'; DVC and YAML 1.2 read a number.
    path = write_params(tmp_path, lambda t: t.replace("  lr: auto", "  lr: 1e-3", 1))
    assert load_params(path).train.lr == 0.001


def test_a_duplicate_key_is_refused_naming_it(tmp_path):
    path = write_params(tmp_path, lambda t: t.replace("  lr: auto", "  lr: 0.375\n  lr: 0.5", 1))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  lr: 0.5"))
    with pytest.raises(
        ParamsError,
        match=rf'is not valid YAML: found duplicate key "lr" with value "0.5" '
        rf'\(original value: "0.375"\) \(line {line}\)',
    ):
        load_params(path)


def test_stage_exits_1_with_a_message_and_no_traceback_on_a_typo(tmp_path):
    write_params(tmp_path, lambda t: t + "trian:\n  lr: 1\n")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / "train.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "train: error: params: unknown key 'trian'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # failed before any work


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path):
    # Nine levels of nine aliases: 387 million paths through a 1 KB file. Walking or printing it in full
    # took minutes and a 1 GB message; the check visits each mapping once and the message is cut short.
    lines = ["a0: &a0 {x: 1}"]
    for level in range(1, 9):
        refs = ", ".join(f"k{i}: *a{level - 1}" for i in range(9))
        lines.append(f"a{level}: &a{level} {{{refs}}}")
    text = (REPO_ROOT / "params.yaml").read_text() + "trian: {" + ", ".join(f"k{i}: *a8" for i in range(9)) + "}\n"
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\n" + text)
    import time

    started = time.perf_counter()
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert time.perf_counter() - started < 5
    assert "unknown key 'a0'" in str(caught.value) and len(str(caught.value)) < 1000


@pytest.mark.parametrize(
    "content, fragment",
    [
        (lambda text: text + "deep: " + "[" * 5000 + "]" * 5000 + "\n", "cannot be read as params (RecursionError"),
        (lambda text: text.replace("  seed: 0", "  seed: " + "9" * 5000, 1), "cannot be read as params (ValueError"),
        (lambda text: text.encode("latin-1", "replace") + "# caf\xe9\n".encode("latin-1"), "is not a UTF-8 text file"),
        (
            lambda text: text.replace("  device: auto", "  device: cuda:\u0663", 1),
            "base.device = 'cuda:\u0663' is not allowed",
        ),
    ],
)
def test_hostile_params_files_are_params_errors_not_tracebacks(tmp_path, content, fragment):
    path = tmp_path / "params.yaml"
    written = content((REPO_ROOT / "params.yaml").read_text())
    path.write_bytes(written if isinstance(written, bytes) else written.encode())
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert fragment in str(caught.value)
    with pytest.raises(ParamsError, match="is not a UTF-8 text file"):
        load_params(tmp_path)  # a folder where the file should be


def test_the_sections_every_stage_accepts_are_the_whole_schemas_sections():
    from imgcls.params.core import SECTIONS

    assert tuple(Params.model_fields) == SECTIONS


@pytest.mark.parametrize(
    "view",
    [
        "data.DownloadStageParams",
        "preprocess.PreprocessStageParams",
        "train.TrainStageParams",
        "evaluate.EvaluateStageParams",
        "export.ExportStageParams",
    ],
)
def test_a_stage_reads_only_its_sections_but_refuses_unknown_ones(view):
    import importlib

    from imgcls.params.core import parse_params as parse_sections

    module, name = view.split(".")
    model = getattr(importlib.import_module(f"imgcls.params.{module}"), name)
    raw = committed_params_raw()
    parsed = parse_sections(raw, model)
    assert set(type(parsed).model_fields) <= set(raw)
    broken = {**raw, "export": {**raw["export"], "opset": "x"}} if "export" not in model.model_fields else raw
    parse_sections(broken, model)  # a section the stage does not read is the validate stage's to check
    with pytest.raises(ParamsError, match="unknown key 'trian'"):
        parse_sections({**raw, "trian": {"lr": 1}}, model)


def test_validate_refuses_a_weights_file_that_is_missing_or_not_a_file(tmp_path):
    from imgcls.paths import ProjectPaths
    from imgcls.validate import validate

    paths = ProjectPaths(tmp_path)
    missing = real_params(train={"init_from": "models/gone.pt", "trust_weights_file": True})
    with pytest.raises(ParamsError, match="train.init_from = 'models/gone.pt': no such file"):
        validate(missing, paths)
    (tmp_path / "models").mkdir()
    folder = real_params(train={"model": "resnet18", "pretrained": "models", "trust_weights_file": True})
    with pytest.raises(ParamsError, match="train.pretrained = 'models' is not a regular file"):
        validate(folder, paths)
    assert not paths.params_stamp.exists()  # nothing downstream may run
    (tmp_path / "models" / "start.pt").write_bytes(b"weights")
    validate(real_params(train={"init_from": "models/start.pt", "trust_weights_file": True}), paths)
    assert paths.params_stamp.is_file()
