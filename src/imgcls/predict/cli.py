"""`imgcls predict SOURCE...`: run a trained model on images, folders, globs, archives, videos or a camera.

    imgcls predict photo.jpg holiday/ 'shots/**/*.png' batch.zip clip.mp4 --every 5 --top-k 3 --output out.csv
    imgcls predict --camera 0

Results go to the terminal (a table, then a summary line with images/s and, for a labelled folder laid out
as <class>/<images>, accuracy per class) and, with --output, to a .csv, .json or .jsonl file written
atomically. An unreadable image is reported by name and the rest still run; the exit status is 1 at the end
unless --skip-bad."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path
from .models import LoadedModel, load_model
from .sources import FileJob, Item, camera_frames, decode_jobs, plan_sources, video_frames

DEFAULT_MODEL = Path("data/export/model.onnx")
OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")
TABLE_ROWS = 20  # rows printed on the terminal before "... and N more"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgcls predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="image files, folders, glob patterns, .tar/.tar.gz/.zip archives, video files")
    parser.add_argument("--camera", type=int, metavar="N", help="read camera N (/dev/videoN) instead of files")
    parser.add_argument("--frames", type=int, metavar="N", help="with --camera: stop after N predictions")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"model file: .onnx (default {DEFAULT_MODEL}), .torchscript.pt or checkpoint.pt")
    parser.add_argument("--int8", action="store_true", help="use the int8 ONNX model beside --model (model.int8.onnx)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="classes reported per image (default 1)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write results to FILE (.csv, .json or .jsonl)")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="videos and camera: every Nth frame")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="inference threads (default: all cores); image decoding uses as many processes")
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per inference call")
    parser.add_argument("--skip-bad", action="store_true", help="exit 0 even when some images could not be read")
    parser.add_argument("--quiet", action="store_true", help="no table, only the summary line")
    args = parser.parse_args(argv)
    if not args.sources and args.camera is None:
        parser.error("give at least one SOURCE or --camera N")
    if args.sources and args.camera is not None:
        parser.error("give SOURCEs or --camera, not both")
    for name in ("top_k", "every", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.output is not None and args.output.suffix.lower() not in OUTPUT_SUFFIXES:
        parser.error(f"--output {args.output}: the suffix says the format: one of {', '.join(OUTPUT_SUFFIXES)}")
    return args


def items_of(args: argparse.Namespace, model: LoadedModel, scratch: Path, threads: int) -> Iterator[Item]:
    size, channels = model.image_size, model.channels
    if args.camera is not None:
        yield from camera_frames(args.camera, image_size=size, channels=channels, every=args.every, limit=args.frames)
        return
    planned = plan_sources(args.sources, model.class_names, scratch)
    run: list[FileJob] = []
    for entry in planned + [None]:
        if isinstance(entry, FileJob):
            run.append(entry)
            continue
        if run:  # consecutive image files decode together on the process pool
            yield from decode_jobs(run, image_size=size, channels=channels, workers=threads)
            run = []
        if entry is not None:
            yield from video_frames(entry, image_size=size, channels=channels, every=args.every, threads=threads)


def batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def result_row(item: Item, probabilities: np.ndarray | None, class_names: list[str], k: int) -> dict:
    row = {"source": item.name}
    if probabilities is not None:
        top = np.argsort(-probabilities, kind="stable")[:k]
        row["top"] = [{"class": class_names[i], "probability": round(float(probabilities[i]), 6)} for i in top]
    else:
        row["error"] = item.error
    if item.label is not None:
        row["true_class"] = class_names[item.label]
    return row


def write_output(path: Path, rows: list[dict], k: int) -> None:
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".json":
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
        elif suffix == ".jsonl":
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["source"] + [f"{f}_{i}" for i in range(1, k + 1) for f in ("class", "probability")]
                            + ["true_class", "error"])
            for r in rows:
                top = [v for t in r.get("top", []) for v in (t["class"], t["probability"])]
                writer.writerow([r["source"]] + top + [""] * (2 * k - len(top)) + [r.get("true_class", ""),
                                                                                 r.get("error", "")])
            tmp.write_text(buffer.getvalue())


def _progress(total: int | None):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", leave=False)


def predict_main(args: argparse.Namespace) -> int:
    threads = args.threads or os.cpu_count() or 1
    model = load_model(args.model, threads=threads, int8=args.int8)
    k = min(args.top_k, len(model.class_names))
    rows: list[dict] = []
    correct, seen_labelled = np.zeros(len(model.class_names)), np.zeros(len(model.class_names))
    bad = 0
    printed = 0
    quiet = args.quiet
    if not quiet:
        print(f"model {model.path} ({model.kind}{', int8' if args.int8 else ''}): {len(model.class_names)} classes, "
              f"input {model.channels}x{model.image_size}x{model.image_size}", flush=True)
    started = time.perf_counter()
    bar = _progress(None)
    with tempfile.TemporaryDirectory(prefix="imgcls-predict-") as scratch:
        for batch in batches(items_of(args, model, Path(scratch), threads), args.batch_size):
            good = [item for item in batch if item.image is not None]
            probabilities = iter(model.probabilities(np.stack([i.image for i in good])) if good else [])
            for item in batch:
                row = result_row(item, next(probabilities) if item.image is not None else None,
                                 model.class_names, k)
                rows.append(row)
                if item.image is None:
                    bad += 1
                    print(f"predict: cannot read {item.name}: {item.error}", file=sys.stderr, flush=True)
                    continue
                if item.label is not None:
                    seen_labelled[item.label] += 1
                    correct[item.label] += row["top"][0]["class"] == model.class_names[item.label]
                if not quiet and printed < TABLE_ROWS:
                    top = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
                    truth = f"  (true: {row['true_class']})" if "true_class" in row else ""
                    print(f"{item.name[-60:]:<60}  {top}{truth}", flush=True)
                    printed += 1
            if bar is not None:
                bar.update(len(batch))
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    predicted = len(rows) - bad
    if not quiet and predicted > printed:
        print(f"... and {predicted - printed} more" + (f" (all in {args.output})" if args.output else
                                                       " (use --output FILE to keep them all)"))
    if args.output is not None:
        write_output(args.output, rows, k)
    summary = f"predict: {predicted} images in {seconds:.2f} s ({predicted / max(seconds, 1e-9):,.0f} images/s)"
    if seen_labelled.sum():
        summary += f"; labelled folder: accuracy {correct.sum() / seen_labelled.sum():.4f} on {int(seen_labelled.sum())}"
        per_class = [f"{name} {correct[i] / seen_labelled[i]:.3f}" for i, name in enumerate(model.class_names)
                     if seen_labelled[i]]
        summary += " (" + ", ".join(per_class) + ")"
    if bad:
        summary += f"; {bad} unreadable" + ("" if args.skip_bad else " (exit status 1; --skip-bad to ignore)")
    if args.output is not None:
        summary += f"; results in {args.output}"
    print(summary, flush=True)
    return 1 if bad and not args.skip_bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return predict_main(args)
    except UserError as error:
        print(f"predict: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("predict: interrupted", file=sys.stderr, flush=True)
        return 130
