import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT
from imgcls.params import Params, ParamsError, load_params, parse_params


def committed_params() -> dict:
    return yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def test_committed_params_parse_and_match_their_types():
    params = parse_params(committed_params())
    assert params.train.model == "fast"
    assert params.data.dataset == "fashion-mnist"
    assert isinstance(params.train.weight_decay, float)
    assert params.train.augment.translate == 2


def test_every_dataclass_field_appears_in_params_yaml():
    # params.yaml is the one place users read and edit: nothing may hide in code defaults only.
    raw = committed_params()
    for section, values in Params().__dict__.items():
        for key in values.__dict__:
            assert key in raw[section], f"{section}.{key} is missing from params.yaml"


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda p: p.update(trian={"lr": 1}), "unknown key 'trian'"),
        (lambda p: p["train"].update(lrr=0.1), "unknown key 'train.lrr'"),
        (lambda p: p["train"].update(lr="fast"), "train.lr = 'fast' has the wrong type; expected a number"),
        (lambda p: p["train"].update(epochs=2.5), "train.epochs = 2.5 has the wrong type; expected an integer"),
        (lambda p: p["train"].update(lr=-1), "train.lr = -1.0 is not allowed; expected 0 < lr <= 10"),
        (lambda p: p["train"].update(model="resnet9000"), "train.model = 'resnet9000' has the wrong type; expected one of 'lenet'"),
        (lambda p: p["train"]["augment"].update(flip="yes"), "train.augment.flip = 'yes' has the wrong type; expected true or false"),
        (lambda p: p["preprocess"].update(val_fraction=1.5), "preprocess.val_fraction = 1.5 is not allowed"),
        (lambda p: p["data"].update(dataset="mnist"), "data.dataset = 'mnist'"),
        (lambda p: p["base"].update(device="tpu"), "base.device = 'tpu' is not allowed"),
        (lambda p: p["train"].update(warmup_epochs=50), "train.warmup_epochs = 50.0 is not allowed; expected 0..train.epochs (10)"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(mutate, fragment):
    raw = committed_params()
    mutate(raw)
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    assert fragment in str(caught.value)


def test_stage_exits_1_with_a_message_and_no_traceback_on_a_typo(tmp_path):
    raw = committed_params()
    raw["trian"] = {"lr": 1}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "train.py")], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "train: error: params: unknown key 'trian'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # failed before any work


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
