import importlib
import logging
import os
import time
import warnings

import numpy as np
import pytest
import torch

from imgcls.deploy.export import check_parity, export_onnx, export_torchscript, measure_latency
from imgcls.errors import CheckpointError, ExportError
from imgcls.model.checkpoint import load_checkpoint, plain_state_dict, save_checkpoint
from imgcls.model.networks import with_tta
from imgcls.model.registry import MODELS, build_model

ARGUMENTS = {"in_channels": 1, "num_classes": 3, "image_size": 16, "mean": [0.3], "std": [0.2], "width": 8}


def trained_looking_model(name="convnet"):
    torch.manual_seed(0)
    arguments = ARGUMENTS
    if MODELS[name].torchvision:  # grayscale repeated to RGB, then ImageNet's three-channel normalization
        arguments = {**ARGUMENTS, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model = build_model(name, **arguments)
    model.train()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        model(torch.rand(32, 1, 16, 16))
    return model.eval()


def test_checkpoint_round_trip_is_self_describing_and_safe(tmp_path):
    model = trained_looking_model()
    path = tmp_path / "model" / "checkpoint.pt"
    save_checkpoint(
        path,
        torch.compile(model),
        architecture="convnet",
        arguments=ARGUMENTS,
        class_names=["a", "b", "c"],
        mean=[0.3],
        std=[0.2],
        params={"train": {"lr": 0.1}},
    )
    raw = torch.load(path, weights_only=True)  # plain data only
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in raw["state_dict"])
    assert raw["architecture"] == "convnet" and raw["class_names"] == ["a", "b", "c"]
    assert raw["normalization"]["mean"] == [0.3] and raw["params"]["train"]["lr"] == 0.1
    loaded, checkpoint = load_checkpoint(path)
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert not loaded.training
    assert [p.name for p in tmp_path.joinpath("model").iterdir()] == ["checkpoint.pt"]  # no temp files


def test_plain_state_dict_strips_wrappers():
    model = trained_looking_model()
    wrapped = torch.nn.DataParallel(model)
    assert plain_state_dict(wrapped).keys() == model.state_dict().keys()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match="run the train stage first"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable imgcls checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "name, tta",
    [
        ("convnet", "mirror"),
        ("fast", "mirror_shifts"),
        ("lenet", "none"),
        ("resnet18", "none"),
        ("mobilenet_v3_small", "none"),
    ],
)
def test_exports_match_pytorch_and_take_images_in_unit_range(tmp_path, name, tta):
    model = with_tta(trained_looking_model(name), tta).eval()
    images = np.random.default_rng(0).random((40, 1, 16, 16), dtype=np.float32)
    example = torch.from_numpy(images[:2])
    export_torchscript(model, example, tmp_path / "m.pt", {"class_names": ["a", "b"]})
    export_onnx(model, example, tmp_path / "m.onnx", opset=17)
    result = check_parity(model, tmp_path / "m.pt", tmp_path / "m.onnx", images, atol=1e-4)
    assert result["onnx"]["same_predictions"] and result["onnx"]["max_abs_logit_diff"] <= 1e-4
    assert result["torchscript"]["max_abs_logit_diff"] <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(images[:7])).numpy()
    # Batch size differs from the export example: the batch axis is dynamic; normalization is inside.
    np.testing.assert_allclose(session.run(None, {"images": images[:7]})[0], expected, atol=1e-4)
    latency = measure_latency(tmp_path / "m.pt", tmp_path / "m.onnx", images[0], calls=200)
    # Milliseconds per batch-1 call, as our own clock sees the same session (catches a unit or batch mistake).
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    single = images[:1]
    started = time.perf_counter()
    for _ in range(100):
        session.run(None, {"images": single})
    own_ms = (time.perf_counter() - started) * 10
    assert 0.1 < latency["onnxruntime_median_ms"] / own_ms < 10
    assert latency["calls"] == 200 and latency["threads"] == 1


def test_parity_failure_stops_the_export(tmp_path):
    model = trained_looking_model()
    images = np.random.default_rng(1).random((20, 1, 16, 16), dtype=np.float32)
    example = torch.from_numpy(images[:2])
    export_torchscript(model, example, tmp_path / "m.pt", {"class_names": ["a", "b"]})
    export_onnx(model, example, tmp_path / "m.onnx", opset=17)
    with torch.no_grad():
        model.head.bias.add_(0.01)  # the PyTorch model drifts from what was exported
    with pytest.raises(ExportError, match=r"differs from the PyTorch model on 20 test images: max \|logit diff\| 0.01"):
        check_parity(model, tmp_path / "m.pt", tmp_path / "m.onnx", images, atol=1e-4)


def saved(tmp_path, **changes):
    """A good checkpoint of a small fast model, then ``changes`` applied to its stored dict."""
    model = trained_looking_model("fast")
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(
        path,
        model,
        architecture="fast",
        arguments=ARGUMENTS,
        class_names=["a", "b", "c"],
        mean=[0.3],
        std=[0.2],
        params={},
    )
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del payload[key]
        elif callable(value):
            payload[key] = value(payload[key])
        else:
            payload[key] = value
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"state_dict": None}, "missing state_dict"),
        ({"architecture": "resnet"}, "unknown architecture 'resnet'"),
        ({"arguments": lambda a: {**a, "width": 100000}}, "arguments.width = 100000"),
        ({"arguments": lambda a: {**a, "depth": 3}}, "arguments.depth = 3"),
        ({"arguments": lambda a: {**a, "image_size": 8}}, "fast needs images of at least 9 pixels"),
        ({"class_names": ["a", "b"]}, "class_names ['a', 'b'] do not match the head's 3 distinct classes"),
        ({"class_names": ["a", "a", "b"]}, "class_names ['a', 'a', 'b'] do not match the head's 3 distinct classes"),
        ({"state_dict": lambda s: {**s, 7: torch.zeros(1)}}, "state_dict is not a mapping of names to tensors"),
        (
            {
                "state_dict": lambda s: {
                    k: v.clone().fill_(float("nan")) if k == "head.weight" else v for k, v in s.items()
                }
            },
            "weights ['head.weight'] hold NaN or infinite values",
        ),
        ({"state_dict": lambda s: {k: v for k, v in s.items() if not k.startswith("head")}}, "Missing key(s)"),
        ({"state_dict": lambda s: {**s, "head.weight": torch.zeros(5, 5)}}, "size mismatch for head.weight"),
        ({"state_dict": lambda s: {**s, "extra.weight": torch.zeros(1)}}, "Unexpected key(s)"),
    ],
)
def test_damaged_checkpoints_are_named_with_the_command_that_rebuilds_them(tmp_path, changes, fragment):
    path = saved(tmp_path, **changes)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert fragment in str(caught.value) and "dvc repro -f train" in str(caught.value)
    assert load_checkpoint(saved(tmp_path / "good"))[1]["architecture"] == "fast"  # the untouched one loads


def test_a_checkpoint_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="expected a dict of model data, found list"):
        load_checkpoint(path)


def test_temporaries_of_killed_runs_are_removed_by_the_next_stage_write_and_nothing_else(tmp_path):
    from imgcls.fileio import atomic_dir

    target = tmp_path / "data" / "raw"
    target.parent.mkdir()
    dead = target.parent / ".raw.imgcls.999999999.abcd1234.tmp"  # no process has this pid
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "big.bin").write_bytes(b"x" * 1000)
    dead_old = target.parent / ".raw.imgcls.999999999.zz_x9876.old"  # killed between the two renames
    dead_old.mkdir()
    alive = target.parent / f".raw.imgcls.{os.getpid()}.efgh5678.tmp"  # a running writer's: left alone
    alive.mkdir()
    # Names a user (or another tool) may have: similar, but not ours. None may be touched.
    lookalikes = [
        ".raw.old",
        ".raw.999999999.abcd.tmp",
        ".raw.imgcls.999999999.abcd1234.tmp.keep",
        ".raw.imgcls.999999999.toolongrandom.tmp",
    ]
    for name in lookalikes:
        (target.parent / name).mkdir()
        (target.parent / name / "precious.txt").write_text("mine")
    with atomic_dir(target, clean_stale=True) as tmp:
        (tmp / "ok").write_text("done")
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["raw", alive.name] + lookalikes)
    assert (target / "ok").read_text() == "done"
    # Replacing an existing folder moves it aside under this process's own unique name, then removes that only.
    with atomic_dir(target) as tmp:
        (tmp / "ok").write_text("again")
    assert sorted(p.name for p in target.parent.iterdir()) == sorted(["raw", alive.name] + lookalikes)
    assert all((target.parent / name / "precious.txt").read_text() == "mine" for name in lookalikes)


def test_writes_outside_the_project_never_clean_anything(tmp_path):
    from imgcls.fileio import atomic_path

    stale = tmp_path / ".report.csv.imgcls.999999999.abcd1234.tmp"
    stale.write_text("looks like ours, but this is the user's folder")
    with atomic_path(tmp_path / "report.csv") as tmp:
        tmp.write_text("rows")
    assert stale.read_text().startswith("looks like ours")
    assert (tmp_path / "report.csv").read_text() == "rows"


def test_int8_calibration_batch_by_batch_gives_the_ranges_of_calibrating_all_at_once(tmp_path):
    """quantize_int8 merges each batch's ranges (bounded memory); the int8 model must be the one ONNX Runtime
    makes from all calibration images at once (ONNX Runtime's other option, CalibMaxIntermediateOutputs,
    silently drops the batches it has collected)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgcls.deploy.export import export_onnx
    from imgcls.deploy.quantize import CALIBRATION_BATCH, quantize_int8

    images = np.random.default_rng(0).random((5 * CALIBRATION_BATCH, 1, 28, 28), dtype=np.float32)
    model = build_model("fast", in_channels=1, num_classes=10, image_size=28, mean=[0.3], std=[0.35]).eval()
    model.initialize_from_data(torch.from_numpy((images * 255).astype(np.uint8)))
    export_onnx(model, torch.from_numpy(images[:2]), tmp_path / "m.onnx", 17)
    root_level = logging.getLogger().level
    quantize_int8(tmp_path / "m.onnx", tmp_path / "batched.onnx", images)
    assert logging.getLogger().level == root_level  # the quantizer's log lines are quieted inside the call only

    class AllAtOnce(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([images[i : i + CALIBRATION_BATCH] for i in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    quant_pre_process(str(tmp_path / "m.onnx"), str(tmp_path / "pre.onnx"), skip_symbolic_shape=True)
    quantize_static(
        str(tmp_path / "pre.onnx"),
        str(tmp_path / "plain.onnx"),
        AllAtOnce(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,  # as quantize_int8 does (7-bit weights)
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    batched, plain = (
        {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer}
        for p in (tmp_path / "batched.onnx", tmp_path / "plain.onnx")
    )
    assert set(batched) == set(plain) and len(batched) > 50
    assert all(np.array_equal(batched[name], plain[name]) for name in plain)


def test_importing_the_export_modules_changes_nothing_global():
    """No warning filter and no logger level is set by importing (here: re-running) a module."""
    from imgcls.deploy import export, quantize, stage

    root_level = logging.getLogger().level
    with warnings.catch_warnings():
        warnings.resetwarnings()  # no filters: any a module installs shows
        for module in (export, quantize, stage):
            importlib.reload(module)
        assert warnings.filters == []
    assert logging.getLogger().level == root_level
