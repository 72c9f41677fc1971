"""`imgcls predict SOURCE...`: run a trained model on images, folders, globs, archives, videos or a camera.

    imgcls predict photo.jpg holiday/ 'shots/**/*.png' batch.zip clip.mp4 --every 5 --top-k 3 --output out.csv
    imgcls predict --camera 0

Results go to the terminal (a table, then a summary line with images/s and, for a labelled folder laid out
as <class>/<images>, accuracy per class) and, with --output, to a .csv, .json or .jsonl file written
as the results come (a stop, a dead worker or an error keeps what was finished: the file is completed and
published with the rows done, and the message says so). An unreadable image is reported by name and the rest
still run; the exit status is 1 at the end unless --skip-bad. Only ONNX models load without --trust-model:
TorchScript files and checkpoints can carry code."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path
from ..report import LISTED, progress_bar
from .models import STOP_SIGNALS, LoadedModel, load_model
from .sources import FileJob, Item, Skipped, camera_frames, decode_jobs, plan_sources, video_frames

DEFAULT_MODEL = Path("data/export/model.onnx")
OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")
TABLE_ROWS = LISTED  # rows printed on the terminal before "... and N more"
MAX_THREADS = 1024


class Terminated(BaseException):
    """SIGTERM or SIGHUP (a closed terminal or SSH session): unwinds like Ctrl-C, so temporaries are removed
    and finished results kept."""


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes, newlines) and undecodable bytes of
    file names shown as escapes instead of acting on the terminal or splitting a line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcls predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="image files, folders, glob patterns, .tar/.tar.gz/.zip archives, video files",
    )
    parser.add_argument("--camera", type=int, metavar="N", help="read camera N (/dev/videoN) instead of files")
    parser.add_argument("--frames", type=int, metavar="N", help="with --camera: stop after N predictions")
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"model file: .onnx (default {DEFAULT_MODEL}), .torchscript.pt or checkpoint.pt",
    )
    parser.add_argument(
        "--trust-model",
        action="store_true",
        help="allow a TorchScript or checkpoint (.pt) model: such files can run code when loaded, "
        "so only for files from someone you trust; ONNX needs no trust",
    )
    parser.add_argument("--int8", action="store_true", help="use the int8 ONNX model beside --model (model.int8.onnx)")
    parser.add_argument("--top-k", type=int, default=1, metavar="K", help="classes reported per image (default 1)")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write results to FILE (.csv, .json or .jsonl)")
    parser.add_argument("--every", type=int, default=1, metavar="N", help="videos and camera: every Nth frame")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="inference threads (default: all cores); image decoding uses as many processes",
    )
    parser.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per inference call")
    parser.add_argument("--skip-bad", action="store_true", help="exit 0 even when some images could not be read")
    parser.add_argument("--quiet", action="store_true", help="no table, only the summary line")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, checked: a bad combination or value exits with argparse's usage message (status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        parser.error(problem)
    return args


def argument_problem(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the parsed arguments, or None."""
    if not args.sources and args.camera is None:
        return "give at least one SOURCE or --camera N"
    if args.sources and args.camera is not None:
        return "give SOURCEs or --camera, not both"
    for name in ("top_k", "every", "batch_size"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if not 0 <= args.threads <= MAX_THREADS:
        return f"--threads must be 0 (all cores) to {MAX_THREADS}"
    if args.frames is not None and args.frames < 1:
        return "--frames must be at least 1"
    return output_problem(args.output) if args.output is not None else None


def output_problem(path: Path) -> str | None:
    """Why ``path`` cannot take the results (a folder, an unknown suffix, not a regular file), or None."""
    output = printable(str(path))
    if path.is_dir():
        return f"--output {output} is a folder; name a file in it, such as {output}/results.csv"
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        return f"--output {output}: the suffix says the format: one of {', '.join(OUTPUT_SUFFIXES)}"
    if path.exists() and not path.is_file():
        return f"--output {output} exists and is not a regular file"
    return None


def items_of(args: argparse.Namespace, model: LoadedModel, scratch: Path, threads: int) -> Iterator[Item]:
    # Every picture is made square the way the model's training images were (the model file's resize).
    size, channels, resize = model.image_size, model.channels, model.resize
    if args.camera is not None:
        yield from camera_frames(
            args.camera, image_size=size, channels=channels, every=args.every, limit=args.frames, resize=resize
        )
        return
    planned = plan_sources(args.sources, model.class_names, scratch)
    run: list[FileJob] = []
    for entry in planned + [None]:
        if isinstance(entry, FileJob):
            run.append(entry)
            continue
        if run:  # consecutive image files decode together on the process pool
            yield from decode_jobs(run, image_size=size, channels=channels, workers=threads, resize=resize)
            run = []
        if isinstance(entry, Skipped):
            yield Item(entry.name, None, None, entry.reason)
        elif entry is not None:
            yield from video_frames(
                entry, image_size=size, channels=channels, every=args.every, threads=threads, resize=resize
            )


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


class ResultWriter:
    """Rows written to an open file as they come, in the format the suffix names (.csv, .json, .jsonl).
    File names that are not valid UTF-8 are written back as their original bytes (surrogate escapes)."""

    def __init__(self, file: IO[str], suffix: str):
        self.file, self.suffix, self.k, self.rows = file, suffix, 0, 0

    def begin(self, k: int) -> None:
        """Start the file for ``k`` classes per row (known once the model is loaded)."""
        self.k = k
        if self.suffix == ".csv":
            self.csv = csv.writer(self.file)
            self.csv.writerow(
                ["source"]
                + [f"{f}_{i}" for i in range(1, k + 1) for f in ("class", "probability")]
                + ["true_class", "error"]
            )
        elif self.suffix == ".json":
            self.file.write("[")

    def write(self, row: dict) -> None:
        if self.suffix == ".csv":
            top = [v for t in row.get("top", []) for v in (t["class"], t["probability"])]
            self.csv.writerow(
                [row["source"]]
                + top
                + [""] * (2 * self.k - len(top))
                + [row.get("true_class", ""), row.get("error", "")]
            )
        elif self.suffix == ".json":
            self.file.write(("," if self.rows else "") + "\n " + json.dumps(row))
        else:
            self.file.write(json.dumps(row) + "\n")
        self.rows += 1

    def finish(self) -> None:
        if self.suffix == ".json" and self.k:
            self.file.write("\n]\n")
        self.file.flush()


@contextlib.contextmanager
def result_file(path: Path) -> Iterator[ResultWriter]:
    """A ResultWriter on a temporary file beside ``path``, published atomically when the run ends, also when
    it ends early with rows done (those rows are kept; the caller says the file is partial). A run that
    ends before any row leaves ``path`` as it was."""
    failure: BaseException | None = None
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as file:
            writer = ResultWriter(file, path.suffix.lower())
            try:
                yield writer
            except BaseException as error:  # Ctrl-C, SIGTERM, a dead worker: keep what is finished
                failure = error
            writer.finish()
        if failure is not None and not writer.rows:
            raise failure  # nothing to keep: atomic_path removes the temporary, path is untouched
    if failure is not None:
        raise failure


def predict_main(args: argparse.Namespace) -> int:
    cores = os.cpu_count() or 1
    # More threads than cores only make the threads wait for each other (1,024 on 2 cores: 70 times slower).
    threads = min(args.threads or cores, cores)
    if args.threads > cores and not args.quiet:
        print(f"predict: --threads {args.threads} but this machine has {cores} cores: using {cores}", file=sys.stderr)
    with contextlib.ExitStack() as stack:
        # The output is opened first: a path that cannot be written fails now, not after all the inference.
        writer = stack.enter_context(result_file(args.output)) if args.output is not None else None
        try:
            return run_predictions(args, threads, writer)
        except (UserError, KeyboardInterrupt, Terminated):
            if writer is not None and writer.rows:
                print(
                    f"predict: kept the {writer.rows} result(s) finished before the stop in "
                    f"{printable(str(args.output))}",
                    file=sys.stderr,
                    flush=True,
                )
            raise
    raise AssertionError("unreachable")


@dataclass
class Tally:
    """What a run has done so far, for the table and the summary line."""

    classes: int
    predicted: int = 0
    unreadable: int = 0
    printed: int = 0  # table rows shown on the terminal
    correct: np.ndarray = field(init=False)  # per class, images of a labelled folder predicted right
    labelled: np.ndarray = field(init=False)  # per class, images of a labelled folder

    def __post_init__(self) -> None:
        self.correct, self.labelled = np.zeros(self.classes), np.zeros(self.classes)


def run_predictions(args: argparse.Namespace, threads: int, writer: ResultWriter | None) -> int:
    """Load the model, predict every item the sources give (rows to ``writer`` and the terminal), print the
    summary; the exit status."""
    model = load_model(args.model, threads=threads, int8=args.int8, trust=args.trust_model)
    k = min(args.top_k, len(model.class_names))
    if writer is not None:
        writer.begin(k)
    if not args.quiet:
        print(model_line(model, int8=args.int8), flush=True)
    tally = Tally(len(model.class_names))
    started = time.perf_counter()
    bar = progress_bar(None, unit="img")
    with tempfile.TemporaryDirectory(prefix="imgcls-predict-") as scratch:
        for batch in batches(items_of(args, model, Path(scratch), threads), args.batch_size):
            for item, row in zip(batch, predict_batch(model, batch, k), strict=True):
                if writer is not None:
                    writer.write(row)
                show_row(item, row, tally, model.class_names, quiet=args.quiet)
            if bar is not None:
                bar.update(len(batch))
            if writer is not None:
                writer.file.flush()
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    output = printable(str(args.output)) if args.output is not None else None
    if not args.quiet and tally.predicted > tally.printed:
        print(
            f"... and {tally.predicted - tally.printed} more"
            + (f" (all in {output})" if output else " (use --output FILE to keep them all)")
        )
    print(summary_line(tally, seconds, model.class_names, output=output, skip_bad=args.skip_bad), flush=True)
    return 1 if not tally.predicted or (tally.unreadable and not args.skip_bad) else 0


def model_line(model: LoadedModel, *, int8: bool) -> str:
    return (
        f"model {printable(str(model.path))} ({model.kind}{', int8' if int8 else ''}): "
        f"{len(model.class_names)} classes, input {model.channels}x{model.image_size}x{model.image_size}, "
        f"resize {model.resize}"
    )


def predict_batch(model: LoadedModel, batch: list[Item], k: int) -> list[dict]:
    """One result row per item: the top ``k`` classes of each readable image (one inference call for the
    batch), the error of each unreadable one."""
    good = [item for item in batch if item.image is not None]
    probabilities = iter(model.probabilities(np.stack([i.image for i in good])) if good else [])
    return [
        result_row(item, next(probabilities) if item.image is not None else None, model.class_names, k)
        for item in batch
    ]


def show_row(item: Item, row: dict, tally: Tally, class_names: list[str], *, quiet: bool) -> None:
    """Count the item; name it on stderr when unreadable, else print its table row (the first TABLE_ROWS)."""
    if item.image is None:
        tally.unreadable += 1
        print(f"predict: cannot read {printable(item.name)}: {printable(str(item.error))}", file=sys.stderr, flush=True)
        return
    tally.predicted += 1
    if item.label is not None:
        tally.labelled[item.label] += 1
        tally.correct[item.label] += row["top"][0]["class"] == class_names[item.label]
    if not quiet and tally.printed < TABLE_ROWS:
        top = "  ".join(f"{printable(t['class'])} {t['probability']:.3f}" for t in row["top"])
        truth = f"  (true: {printable(row['true_class'])})" if "true_class" in row else ""
        print(f"{printable(item.name)[-60:]:<60}  {top}{truth}", flush=True)
        tally.printed += 1


def summary_line(tally: Tally, seconds: float, class_names: list[str], *, output: str | None, skip_bad: bool) -> str:
    """Images and images/s; a labelled folder's accuracy, overall and per class; what went wrong; the file."""
    summary = (
        f"predict: {tally.predicted} images in {seconds:.2f} s ({tally.predicted / max(seconds, 1e-9):,.0f} images/s)"
    )
    correct, labelled = tally.correct, tally.labelled
    if labelled.sum():
        summary += f"; labelled folder: accuracy {correct.sum() / labelled.sum():.4f} on {int(labelled.sum())}"
        per_class = [
            f"{printable(name)} {correct[i] / labelled[i]:.3f}" for i, name in enumerate(class_names) if labelled[i]
        ]
        summary += " (" + ", ".join(per_class) + ")"
    if tally.unreadable:
        summary += f"; {tally.unreadable} unreadable" + ("" if skip_bad else " (exit status 1; --skip-bad to ignore)")
    if not tally.predicted:
        summary += "; no image was predicted (exit status 1)"
    if output is not None:
        summary += f"; results in {output}"
    return summary


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _terminate) for sig in STOP_SIGNALS} if in_main_thread else {}
    try:
        return predict_main(args)
    except UserError as error:
        print(f"predict: error: {printable(str(error))}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("predict: interrupted", file=sys.stderr, flush=True)
        return 130
    except Terminated as stop:
        print(f"predict: terminated ({stop})", file=sys.stderr, flush=True)
        return 128 + signal.Signals[str(stop)].value
    except OSError as error:  # the output file: a full disk, a folder without write permission
        where = f" ({printable(str(error.filename))})" if error.filename else ""
        print(f"predict: error: {error.strerror or error}{where}", file=sys.stderr, flush=True)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
