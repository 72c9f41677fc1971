"""data.resize: how a non-square picture becomes the model's square input (squash, crop, pad), the same way in
preprocess, the decode cache and `imgcls predict` (files and video frames), read from the model file.

Pictures are made here: three bands across the longer side (a quarter red, the centre half green, a quarter
blue), so each mode's result is known pixel by pixel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, real_params
from PIL import Image

from imgcls.errors import ParamsError
from imgcls.params.core import as_dict
from imgcls.params.data import DataParams
from imgcls.paths import ProjectPaths
from imgcls.preprocess import images
from imgcls.preprocess.imagefolder import decode_image_folder
from imgcls.preprocess.images import RESIZE_MODES, decode_image, prepare_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SIZE = 16  # the model's input side in the predict tests
SUMMARY = re.compile(r"([\d,]+) decoded, ([\d,]+) reused from the decode cache")


def banded(width: int, height: int, noise: int = 0, seed: int = 0) -> Image.Image:
    """A width x height RGB picture: red, green, blue bands (1/4, 1/2, 1/4) along the longer side."""
    long = max(width, height)
    quarter = long // 4
    line = np.zeros((long, 3), np.int64)
    line[:quarter], line[quarter : long - quarter], line[long - quarter :] = RED, GREEN, BLUE
    pixels = np.broadcast_to(line[None] if width >= height else line[:, None], (height, width, 3))
    pixels = pixels + np.random.default_rng(seed).integers(-noise, noise + 1, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def prepared(picture: Image.Image, resize: str, size: int = 30) -> np.ndarray:
    return prepare_image(picture, image_size=size, channels=3, resize=resize)  # (3, size, size)


def colour(array: np.ndarray) -> tuple:
    """The one colour of a (3, H, W) region, or None when it holds several."""
    values = {tuple(int(v) for v in pixel) for pixel in array.reshape(3, -1).T}
    return values.pop() if len(values) == 1 else None


# --- The three modes, pixel by pixel --------------------------------------------------------------------------


def test_the_schema_and_the_decoder_name_the_same_modes():
    assert get_args(DataParams.model_fields["resize"].annotation) == RESIZE_MODES
    assert real_params().data.resize == "squash"  # the committed default: metrics made before stay valid
    with pytest.raises(ParamsError, match=r"data\.resize = 'stretch' is not allowed"):
        real_params(data={"resize": "stretch"})
    preprocess_params = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["preprocess"]["params"]
    assert "data.resize" in preprocess_params


@pytest.mark.parametrize("width, height", [(60, 30), (30, 60)])
def test_crop_keeps_only_the_centre_band(width, height):
    array = prepared(banded(width, height), "crop")  # shorter side already 30: no resampling, just the cut
    assert array.shape == (3, 30, 30) and colour(array) == GREEN


@pytest.mark.parametrize("width, height", [(60, 30), (30, 60)])
def test_pad_keeps_the_whole_picture_between_black_bars(width, height):
    picture = banded(width, height)
    array = prepared(picture, "pad")
    # Longer side 60 -> 30, shorter 30 -> 15; 15 pixels of padding: 7 before, 8 after (right or bottom).
    content = np.asarray(picture.resize((width // 2, height // 2), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    if width > height:
        before, inside, after = array[:, :7], array[:, 7:22], array[:, 22:]
        ends = inside[:, :, 0], inside[:, :, 9:21], inside[:, :, -1]
    else:
        before, inside, after = array[:, :, :7], array[:, :, 7:22], array[:, :, 22:]
        ends = inside[:, 0], inside[:, 9:21], inside[:, -1]
    assert before.shape[1:] in ((7, 30), (30, 7)) and colour(before) == (0, 0, 0)
    assert after.shape[1:] in ((8, 30), (30, 8)) and colour(after) == (0, 0, 0)
    np.testing.assert_array_equal(inside, content)
    assert [colour(part) for part in ends] == [RED, GREEN, BLUE]  # the band edges blend; their middles do not


@pytest.mark.parametrize("width, height", [(60, 30), (30, 60), (45, 31), (30, 30)])
def test_squash_is_the_resize_of_before_byte_for_byte(width, height, tmp_path):
    picture = banded(width, height, noise=30)
    before = np.asarray(picture.resize((16, 16), Image.Resampling.BILINEAR, reducing_gap=3.0)).transpose(2, 0, 1)
    np.testing.assert_array_equal(prepared(picture, "squash", 16), before)
    picture.save(tmp_path / "p.png")
    for decoded in (
        decode_image(str(tmp_path / "p.png"), image_size=16, channels=3, max_pixels=10**6),  # the default
        decode_image(str(tmp_path / "p.png"), image_size=16, channels=3, max_pixels=10**6, resize="squash"),
    ):
        np.testing.assert_array_equal(decoded, before)


@pytest.mark.parametrize("width, height", [(45, 31), (31, 45), (44, 30), (17, 40), (40, 17), (40, 40), (16, 50)])
def test_crop_is_torchvisions_resize_and_centre_crop(width, height):
    # Odd overhangs (45x31 -> 23x16: 7 pixels to cut) check the offset rounding, noise checks every pixel.
    from torchvision import transforms

    picture = banded(width, height, noise=60, seed=width * height)
    reference = transforms.CenterCrop(16)(transforms.Resize(16, transforms.InterpolationMode.BILINEAR)(picture))
    np.testing.assert_array_equal(prepared(picture, "crop", 16), np.asarray(reference).transpose(2, 0, 1))


@pytest.mark.parametrize("resize", ["crop", "pad", "squash"])
def test_jpeg_draft_still_shrinks_but_never_below_what_the_mode_needs(resize, tmp_path, monkeypatch):
    banded(640, 160).save(tmp_path / "wide.jpg", quality=95)
    seen = []
    original = images.prepare_image

    def spy(image, **options):
        seen.append(image.size)
        return original(image, **options)

    monkeypatch.setattr(images, "prepare_image", spy)
    array = decode_image(str(tmp_path / "wide.jpg"), image_size=32, channels=3, max_pixels=10**7, resize=resize)
    (drafted,) = seen
    # 640x160 to 32: squash needs 32x32 and crop 128x32 (JPEG decodes at 1/4: 160x40); pad needs 32x8 (1/8).
    assert drafted == {"squash": (160, 40), "crop": (160, 40), "pad": (80, 20)}[resize]
    if resize == "crop":
        assert abs(array[:, :, 2:30].astype(int) - np.array(GREEN)[:, None, None]).max() < 40
    if resize == "pad":  # 32x8, 12 black rows above and below
        assert array[:, :12].max() == 0 and array[:, 20:].max() == 0 and array[:, 12:20].max() > 200


# --- The decode cache and the preprocess stage ----------------------------------------------------------------


def make_folder(root: Path, per_class: int = 4) -> Path:
    """train/ and test/ of two classes, non-square pictures (wide and tall, PNG and JPEG), all different."""
    for split in ("train", "test"):
        for c, name in enumerate(("ants", "bees")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                width, height = (48 + 4 * i, 24 + 2 * c) if i % 2 else (24 + 2 * c, 40 + 4 * i)
                picture = banded(width, height, noise=25, seed=100 * (split == "test") + 10 * c + i)
                picture.save(folder / f"{i}.{'jpg' if i % 3 == 0 else 'png'}", quality=95)
    return root


def decode_folder(root: Path, workdir: Path, resize: str, cache: Path | None = None) -> tuple[dict, list[str]]:
    lines: list[str] = []
    decoded = decode_image_folder(
        root,
        image_size=12,
        channels=3,
        on_bad_image="error",
        max_pixels=10**7,
        workdir=workdir,
        resize=resize,
        log=lines.append,
        workers=1,
        cache_dir=cache,
    )
    return {split: reader.read() for split, (reader, _) in decoded.splits.items()}, lines


def counts(lines: list[str]) -> tuple[int, int]:
    match = next(SUMMARY.search(line) for line in lines if SUMMARY.search(line))
    return int(match.group(1)), int(match.group(2))


def test_the_decode_cache_never_serves_one_mode_for_another(tmp_path):
    root, cache = make_folder(tmp_path / "images"), tmp_path / "cache"
    squash, lines = decode_folder(root, tmp_path / "w1", "squash", cache)
    assert counts(lines) == (16, 0)
    crop, lines = decode_folder(root, tmp_path / "w2", "crop", cache)
    assert counts(lines) == (16, 0)  # nothing reused from the squash decoding
    uncached, _ = decode_folder(root, tmp_path / "w3", "crop")
    for split in crop:
        np.testing.assert_array_equal(crop[split], uncached[split])
        assert not np.array_equal(crop[split], squash[split])
    again, lines = decode_folder(root, tmp_path / "w4", "squash", cache)
    assert counts(lines) == (0, 16)  # each mode keeps its own setting
    np.testing.assert_array_equal(again["train"], squash["train"])
    settings = [json.loads(p.read_text()) for p in cache.glob("*/settings.json")]
    assert sorted(s["resize"] for s in settings) == ["crop", "squash"]


@pytest.fixture
def crop_project(tmp_path, monkeypatch):
    """An image-folder project preprocessed with data.resize: crop through the real download and preprocess
    stage functions; (paths, params)."""
    from imgcls.download.stage import download
    from imgcls.preprocess.stage import preprocess

    root = tmp_path / "project"
    make_folder(root / "data" / "images")
    monkeypatch.chdir(root)
    params = real_params(
        data={"dataset": "imagefolder", "source": "data/images", "image_size": SIZE, "resize": "crop"},
        preprocess={"val_fraction": 0.0},
    )
    paths = ProjectPaths(root)
    download(params, paths)
    preprocess(params, paths)
    return paths, params


def rows(array: np.ndarray) -> list[bytes]:
    return sorted(row.tobytes() for row in array)


def test_preprocess_records_the_mode_and_decodes_with_it(crop_project):
    paths, _ = crop_project
    meta = json.loads((paths.prepared_dir / "meta.json").read_text())
    assert meta["resize"] == "crop" and meta["image_shape"] == [3, SIZE, SIZE]
    files = sorted((paths.root / "data" / "images" / "test").rglob("*.*"))
    expected = [decode_image(str(f), image_size=SIZE, channels=3, max_pixels=10**7, resize="crop") for f in files]
    assert rows(np.load(paths.prepared_dir / "test_images.npy")) == rows(np.stack(expected))


# --- Predict reads the mode from the model file ---------------------------------------------------------------


def save_model_files(paths: ProjectPaths, params_dict: dict, folder: Path) -> dict[str, Path]:
    """An untrained convnet over the prepared data: a checkpoint whose params snapshot is ``params_dict``, and
    its ONNX and TorchScript exports with the metadata the export stage writes."""
    import torch

    from imgcls.deploy.export import export_onnx, export_torchscript
    from imgcls.deploy.metadata import add_onnx_metadata, model_facts
    from imgcls.model.checkpoint import load_checkpoint, save_checkpoint
    from imgcls.model.registry import build_model

    meta = json.loads((paths.prepared_dir / "meta.json").read_text())
    torch.manual_seed(0)
    arguments = {"in_channels": 3, "num_classes": 2, "image_size": SIZE, "mean": meta["mean"], "std": meta["std"]}
    network = build_model("convnet", width=8, **arguments)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"checkpoint": folder / "checkpoint.pt", "onnx": folder / "model.onnx"}
    files["torchscript"] = folder / "model.torchscript.pt"
    save_checkpoint(
        files["checkpoint"],
        network,
        architecture="convnet",
        arguments={**arguments, "width": 8},
        class_names=meta["class_names"],
        mean=meta["mean"],
        std=meta["std"],
        params=params_dict,
    )
    model, checkpoint = load_checkpoint(files["checkpoint"])
    example = torch.zeros((2, 3, SIZE, SIZE))
    facts = model_facts(checkpoint, dataset="imagefolder", test_accuracy=0.5, tta="none")
    export_onnx(model, example, files["onnx"], 17)
    add_onnx_metadata(files["onnx"], facts)
    export_torchscript(model, example, files["torchscript"], facts)
    return files


def run_predict(capsys, *argv: str) -> tuple[int, str, str]:
    from imgcls.predict.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_decodes_files_as_the_preprocess_did_for_every_model_format(crop_project, tmp_path, capsys):
    import onnx

    from imgcls.predict.cli import items_of, parse_args
    from imgcls.predict.models import load_model

    paths, params = crop_project
    files = save_model_files(paths, as_dict(params), tmp_path / "models")
    facts = json.loads(next(p.value for p in onnx.load(str(files["onnx"])).metadata_props if p.key == "imgcls"))
    assert facts["resize"] == "crop"
    test_folder = paths.root / "data" / "images" / "test"
    prepared_rows = rows(np.load(paths.prepared_dir / "test_images.npy"))
    for kind, path in files.items():
        model = load_model(path, threads=1, trust=True)
        assert model.resize == "crop", kind
        args = parse_args([str(test_folder), "--model", str(path)])
        items = list(items_of(args, model, tmp_path, threads=2))  # two decode processes, as predict runs them
        assert len(items) == 8 and rows(np.stack([i.image for i in items])) == prepared_rows, kind
    # End to end: the probabilities predict reports are the model's on the preprocess's pixels.
    output = tmp_path / "predictions.json"
    code, out, err = run_predict(capsys, str(test_folder), "--model", str(files["onnx"]), "--output", str(output))
    assert code == 0 and "resize crop" in out, err
    model = load_model(files["onnx"], threads=1)
    for row in json.loads(output.read_text()):
        image = decode_image(row["source"], image_size=SIZE, channels=3, max_pixels=10**7, resize="crop")
        assert image.tobytes() in prepared_rows
        expected = model.probabilities(image[None])[0]
        assert row["top"][0]["probability"] == pytest.approx(expected.max(), abs=2e-6)


def test_a_model_file_without_resize_means_squash(crop_project, tmp_path):
    import onnx

    from imgcls.predict.models import load_model

    paths, params = crop_project
    old_params = as_dict(params)
    del old_params["data"]["resize"]  # a checkpoint written before data.resize existed
    files = save_model_files(paths, old_params, tmp_path / "old")
    exported = onnx.load(str(files["onnx"]))
    entry = next(p for p in exported.metadata_props if p.key == "imgcls")
    assert json.loads(entry.value)["resize"] == "squash"
    facts = json.loads(entry.value)
    del facts["resize"]  # an export written before data.resize existed
    entry.value = json.dumps(facts)
    onnx.save(exported, str(files["onnx"]))
    for path in files.values():
        assert load_model(path, threads=1, trust=True).resize == "squash"


def test_an_unknown_resize_in_a_model_file_is_refused(crop_project, tmp_path, capsys):
    import onnx

    paths, params = crop_project
    bogus = as_dict(params)
    bogus["data"]["resize"] = "bogus"
    files = save_model_files(paths, bogus, tmp_path / "bogus")
    image = tmp_path / "a.png"
    banded(40, 20).save(image)
    for kind, path in files.items():
        code, _, err = run_predict(capsys, str(image), "--model", str(path), "--trust-model")
        field = "params.data.resize" if kind == "checkpoint" else "metadata field resize"
        assert code == 1 and field in err and "'bogus'" in err and "Traceback" not in err, (kind, err)
    exported = onnx.load(str(files["onnx"]))
    entry = next(p for p in exported.metadata_props if p.key == "imgcls")
    entry.value = json.dumps({**json.loads(entry.value), "resize": ["crop"]})  # not even a string
    onnx.save(exported, str(files["onnx"]))
    code, _, err = run_predict(capsys, str(image), "--model", str(files["onnx"]))
    assert code == 1 and "metadata field resize" in err and "Traceback" not in err, err


def test_video_frames_are_made_square_by_the_mode(tmp_path):
    import av

    from imgcls.predict.sources import video_frames

    video = tmp_path / "wide.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.asarray(banded(64, 32)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = {
        resize: next(video_frames(video, image_size=SIZE, channels=3, every=1, threads=1, resize=resize)).image
        for resize in RESIZE_MODES
    }
    green = np.array(GREEN)[:, None, None]
    assert np.abs(frames["crop"][:, :, 2:14].astype(int) - green).max() < 60  # the centre band only
    assert frames["squash"][0, :, :2].min() > 150  # red at the left edge
    assert frames["pad"][:, :4].max() < 20 and frames["pad"][:, 12:].max() < 20  # 16x8: black above and below
