"""Benchmark: `imgcls predict` speed (issue 10), on the default run's exported model (data/export/).

    .venv/bin/python bench/predict.py [--frames 1500] [--pngs 10000]

Rows (targets from issue 10):
- model only, batch 1, one thread, ONNX Runtime, fp32 and int8 (target >= 2,000 images/s);
- end to end from a 640x480 video file made here from test images through PyAV (decode + convert + resize +
  infer + write a CSV), one thread (target >= 300 frames/s);
- a folder of PNG files made here from test images, two cores (target >= 2,000 images/s).
The end-to-end rows time the installed `imgcls predict` command as a user runs it (wall time, start-up
included) and also report the rate it prints itself (its loop only).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO_ROOT, machine, write_results

WORK = Path("/tmp/imgcls-bench-predict")
MODEL = REPO_ROOT / "data" / "export" / "model.onnx"


def model_only(model: Path, images01: np.ndarray, calls: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [np.ascontiguousarray(images01[i % len(images01)][None]) for i in range(calls)]
    for batch in batches[:50]:
        session.run(None, {name: batch})
    started = time.perf_counter()
    for batch in batches:
        session.run(None, {name: batch})
    return calls / (time.perf_counter() - started)


def make_video(path: Path, images: np.ndarray, frames: int) -> None:
    """640x480 H.264 (or MPEG-4 part 2 where this FFmpeg build has no H.264 encoder) from test images."""
    import av
    from PIL import Image

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        for i in range(frames):
            image = images[i % len(images)]
            picture = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
            picture = picture.convert("RGB").resize((640, 480), Image.Resampling.BILINEAR)
            for packet in stream.encode(av.VideoFrame.from_image(picture)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def run_predict(args: list[str]) -> dict:
    command = [str(Path(sys.executable).parent / "imgcls"), "predict", *args, "--quiet"]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr[-2000:]}")
    match = re.search(r"predict: (\d+) images in ([\d.]+) s", process.stdout)
    count, loop_seconds = int(match.group(1)), float(match.group(2))
    return {
        "images": count,
        "wall_seconds": wall,
        "wall_images_per_second": count / wall,
        "loop_seconds": loop_seconds,
        "loop_images_per_second": count / loop_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--pngs", type=int, default=10000)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    if not MODEL.is_file():
        print(f"skipped: {MODEL} is absent; run `make run` (or dvc repro) first")
        return 0
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from PIL import Image

    from imgcls.arrays import NpyReader

    test = NpyReader(REPO_ROOT / "data" / "prepared" / "test_images.npy").read(0, max(args.pngs, 1000))
    images01 = test[:1000].astype(np.float32) / 255
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    rows = []
    for name, model in (("fp32", MODEL), ("int8", MODEL.with_name("model.int8.onnx"))):
        if model.is_file():
            rate = model_only(model, images01, args.calls)
            rows.append(
                {
                    "row": f"model only, batch 1, 1 thread, {name}",
                    "images_per_second": rate,
                    "target": 2000,
                    "met": rate >= 2000,
                }
            )
    video = WORK / "clip.mp4"
    codec = make_video(video, test, args.frames)
    result = run_predict([str(video), "--threads", "1", "--model", str(MODEL), "--output", str(WORK / "video.csv")])
    rows.append(
        {
            "row": f"video 640x480 ({codec}) end to end, 1 thread",
            **result,
            "target": 300,
            "met": result["wall_images_per_second"] >= 300,
        }
    )
    folder = WORK / "pngs"
    folder.mkdir()
    for i, image in enumerate(test[: args.pngs]):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
    result = run_predict([str(folder), "--threads", "2", "--model", str(MODEL), "--output", str(WORK / "pngs.csv")])
    rows.append(
        {
            "row": f"folder of {args.pngs:,} PNG files, 2 cores",
            **result,
            "target": 2000,
            "met": result["wall_images_per_second"] >= 2000,
        }
    )

    print(f"{'row':<48}{'images/s':>10}{'loop/s':>10}{'target':>8}  met")
    for row in rows:
        rate = row.get("wall_images_per_second", row.get("images_per_second"))
        loop = row.get("loop_images_per_second")
        print(
            f"{row['row']:<48}{rate:>10,.0f}{(f'{loop:,.0f}' if loop else ''):>10}{row['target']:>8,}  "
            f"{'yes' if row['met'] else 'NO'}"
        )
    path = write_results("predict", {"machine": machine(), "model": str(MODEL), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
