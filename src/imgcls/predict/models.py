"""Load a model for prediction from any file the pipeline writes: the ONNX export (its metadata says
everything predict needs), the TorchScript export (the same facts in an extra file) or a checkpoint.

A model file is data from whoever made it. ONNX is loaded as data (a graph of standard operators; ONNX Runtime
runs no code from the file) and is the only format loaded without ``trust``. A TorchScript file is a
program (its scripted methods, ``__setstate__`` among them, run when it loads) and a checkpoint is a pickle
(torch's weights_only loader restricts it, but it remains a parser of a format built to run code): both
need the user's explicit ``--trust-model``.

What a file says about itself is checked before anything is sized from it: types and ranges of the metadata
(image size capped as for checkpoints, 1 or 3 channels, distinct class names, a known resize mode; a file
without one is from before data.resize and means squash), then the graph's declared input and output shapes,
then a probe batch through the model, so a file whose metadata disagrees with its graph is one line naming
the file and the field, never an allocation the metadata asked for or a runtime traceback.
An ONNX graph is data but can still ask for work: it runs in an arena capped at a share of the memory
available, each call under a time limit, and on a thread the main thread watches, so Ctrl-C and SIGTERM stop
it (ONNX Runtime's terminate flag) instead of waiting for a graph that loops for ever.

Every loaded model takes uint8 images (N, C, H, W) at its own input size and returns class probabilities."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..calibration import checked_temperature, checkpoint_temperature
from ..calibration import probabilities as calibrated
from ..deploy.metadata import METADATA_KEY, TORCHSCRIPT_EXTRA_FILE, trained_resize
from ..errors import UserError
from ..host import host_available_memory
from ..params.core import MAX_IMAGE_SIZE
from ..preprocess.images import RESIZE_MODES

MAX_CLASSES = 100_000  # as a checkpoint's num_classes
MAX_CLASS_NAME_CHARS = 256
MAX_METADATA_BYTES = 1 << 20  # a real document is a few KB
ONNX_MEMORY_SHARE = 0.6  # of the memory available when predict starts: the rest is for decoding and the system
PROBE_IMAGES = 2  # a batch of two: a graph fixed at batch 1 fails at load, not on the first real batch
PROBE_SECONDS = 60.0  # two images through any real classifier take well under a second on a CPU
# A call may take this many times the probe's time per image (timings vary), and never less than the floor.
CALL_SECONDS_PER_PROBE = 100
CALL_SECONDS_FLOOR = 60.0
TRUST_HINT = (
    "pass --trust-model only if you trust whoever made the file, or use the ONNX export "
    "(model.onnx), which predict loads as data"
)


# What stops `imgcls predict` cleanly besides Ctrl-C: a kill, and the terminal or SSH session closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@dataclass
class LoadedModel:
    path: Path
    kind: str  # onnx | torchscript | checkpoint
    class_names: list[str]
    image_size: int
    channels: int
    resize: str  # squash | crop | pad: how a picture is made square, as for the model's training images
    facts: dict  # everything the file says about itself (data set, test accuracy, ...)
    logits: Callable[[np.ndarray], np.ndarray]  # float32 images in [0, 1] (N, C, H, W) -> logits (N, K)
    temperature: float = 1.0  # calibration (imgcls.calibration): probabilities are softmax(logits / temperature)

    def probabilities(self, images_uint8: np.ndarray) -> np.ndarray:
        logits = np.asarray(self.logits(images_uint8.astype(np.float32) / 255))
        if logits.shape != (len(images_uint8), len(self.class_names)):
            raise UserError(
                f"{self.path}: the model answered {len(images_uint8)} image(s) with logits of shape "
                f"{tuple(logits.shape)}, not ({len(images_uint8)}, {len(self.class_names)}); the file is "
                "damaged or its metadata does not describe its graph"
            )
        if not np.isfinite(logits).all():  # NaN probabilities would also make the JSON output invalid
            raise UserError(f"{self.path}: the model answered NaN or infinite logits; the file is damaged")
        return calibrated(logits, self.temperature)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def checked_resize(path: Path, value: object, field: str, redo: str) -> str:
    """``value`` when it names a resize mode (RESIZE_MODES); otherwise a UserError naming ``field``."""
    if not (isinstance(value, str) and value in RESIZE_MODES):
        raise UserError(
            f"{path}: {field} = {str(value)[:40]!r} is not one of {', '.join(RESIZE_MODES)} (how a picture is made "
            f"square); the file is damaged or from another version; {redo}"
        )
    return value


def check_facts(path: Path, facts: object) -> dict:
    """The metadata document, checked field by field; the first bad field is a UserError naming it."""
    redo = "re-export it (dvc repro -f export)"
    if not isinstance(facts, dict):
        raise UserError(f"{path}: its imgcls metadata is not a JSON object; {redo}")
    missing = [key for key in ("class_names", "image_size", "channels") if key not in facts]
    if missing:
        raise UserError(f"{path}: its imgcls metadata lacks {', '.join(missing)}; {redo}")
    names, size, channels = facts["class_names"], facts["image_size"], facts["channels"]
    if not (isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES):
        raise UserError(f"{path}: metadata field class_names must be a list of 2..{MAX_CLASSES:,} names; {redo}")
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME_CHARS for n in names) or len(set(names)) != len(
        names
    ):
        raise UserError(
            f"{path}: metadata field class_names must hold distinct names of 1..{MAX_CLASS_NAME_CHARS} "
            f"characters; {redo}"
        )
    if not (_is_int(size) and 1 <= size <= MAX_IMAGE_SIZE):
        raise UserError(
            f"{path}: metadata field image_size = {str(size)[:40]} is not an integer in 1..{MAX_IMAGE_SIZE}; {redo}"
        )
    if not (_is_int(channels) and channels in (1, 3)):
        raise UserError(f"{path}: metadata field channels = {str(channels)[:40]} is not 1 or 3; {redo}")
    # Exports from before data.resize carry no resize: every image was squashed then.
    facts["resize"] = checked_resize(path, facts.get("resize", "squash"), "metadata field resize", redo)
    # Exports from before calibration carry no temperature: their probabilities were plain softmax.
    facts["temperature"] = checked_temperature(facts.get("temperature"), f"{path}: metadata field temperature", redo)
    return facts


def _parse_facts(path: Path, text: str | bytes) -> dict:
    if len(text) > MAX_METADATA_BYTES:
        raise UserError(
            f"{path}: its imgcls metadata is {len(text):,} bytes, over {MAX_METADATA_BYTES:,}; "
            "re-export it (dvc repro -f export)"
        )
    try:
        return check_facts(path, json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: its imgcls metadata is not valid JSON; re-export it (dvc repro -f export)") from None


def _check_declared_shapes(path: Path, facts: dict, inputs: list, outputs: list) -> None:
    """The graph's declared input (N, C, H, W) and output (N, K) against the metadata; symbolic dims pass
    here and are settled by the probe."""
    if len(inputs) != 1:
        raise UserError(f"{path}: the graph takes {len(inputs)} inputs; an imgcls model takes one (images)")
    if not outputs:
        raise UserError(f"{path}: the graph has no outputs")
    declared_in, declared_out = inputs[0].shape, outputs[0].shape
    if inputs[0].type != "tensor(float)" or len(declared_in) != 4:
        raise UserError(
            f"{path}: the graph's input is {inputs[0].type} of shape {declared_in}; an imgcls model takes "
            "float images (N, C, H, W)"
        )
    expected = {
        "channels": (declared_in[1], facts["channels"]),
        "image_size": (declared_in[2], facts["image_size"]),
        "image_size (width)": (declared_in[3], facts["image_size"]),
    }
    if len(declared_out) == 2:
        expected["class_names (count)"] = (declared_out[1], len(facts["class_names"]))
    else:
        raise UserError(f"{path}: the graph's output has shape {declared_out}; an imgcls model answers (N, classes)")
    for field, (graph, meta) in expected.items():
        if isinstance(graph, int) and graph != meta:
            raise UserError(
                f"{path}: metadata field {field.split(' ')[0]} says {meta} but the graph declares {graph}; "
                "the file's metadata does not describe its graph; re-export it (dvc repro -f export)"
            )


def _probe(model: LoadedModel) -> float:
    """A batch of black images through the model: the answer must have one finite logit per class and image.
    Returns the seconds it took per image."""
    started = time.perf_counter()
    try:
        model.probabilities(np.zeros((PROBE_IMAGES, model.channels, model.image_size, model.image_size), np.uint8))
    except UserError:
        raise
    except Exception as error:  # the runtime's own errors for a graph that cannot take its declared input
        raise UserError(
            f"{model.path}: the model fails on {PROBE_IMAGES} {model.channels}x{model.image_size}x"
            f"{model.image_size} images, the input its metadata declares ({type(error).__name__}: "
            f"{str(error)[:200]})"
        ) from None
    return (time.perf_counter() - started) / PROBE_IMAGES


def run_interruptibly(session, feed: dict, *, seconds: float, path: Path) -> np.ndarray:
    """``session.run`` on a worker thread that the calling (main) thread watches: a call past ``seconds``, or a
    Ctrl-C / SIGTERM meanwhile (handled on the main thread, which ONNX Runtime's C++ loop would otherwise hold),
    sets the runtime's terminate flag, which it checks between nodes and between a Loop's iterations."""
    import onnxruntime as ort

    options = ort.RunOptions()
    outcome: dict = {}
    finished = _start_run(session, feed, options, outcome)
    deadline = time.monotonic() + seconds
    try:
        while not _wait_holding_signals(finished, 0.05):
            if time.monotonic() > deadline:
                raise UserError(
                    f"{path}: one inference call ran longer than {seconds:.0f} s and was stopped; the graph "
                    "loops without end or does far more work than a classifier (a damaged or hostile file)"
                )
    finally:
        if not finished.is_set():
            options.terminate = True
            finished.wait(10)
    if "error" in outcome:
        raise _runtime_error(outcome["error"], path, batch=len(next(iter(feed.values())))) from None
    return outcome["logits"]


def _start_run(session, feed: dict, options, outcome: dict) -> threading.Event:
    """Start ``session.run`` on a daemon thread that puts its logits or its exception into ``outcome``; the
    returned Event is set when it has finished. Completion is an Event of ours, not Thread.is_alive(): an
    exception (Ctrl-C, SIGTERM) raised inside Thread.join can leave the thread marked as stopped while it still
    runs (CPython gh-90882), and a runtime thread still running at exit aborts the process."""
    finished = threading.Event()

    def work() -> None:
        try:
            outcome["logits"] = session.run(None, feed, options)[0]
        except Exception as error:  # reported on the calling thread
            outcome["error"] = error
        finally:
            finished.set()

    with signals_held():
        threading.Thread(target=work, name="onnx-run", daemon=True).start()
    return finished


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and the stop signals back while threading waits on a Condition (Thread.start, Event.wait):
    their handlers raise wherever the main thread is, and raised inside a Condition's lock handling the
    exception leaves the lock broken ("release unlocked lock", a traceback instead of a clean stop). A signal
    that came meanwhile is delivered, on the main thread, as soon as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, *STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_holding_signals(event: threading.Event, seconds: float) -> bool:
    """``event.wait(seconds)`` with the signals held (signals_held): a Ctrl-C or stop meanwhile is raised after
    it, at most ``seconds`` later."""
    with signals_held():
        return event.wait(seconds)


def _runtime_error(error: Exception, path: Path, *, batch: int) -> UserError:
    """ONNX Runtime's failure on a batch, as one line a user can act on."""
    text = str(error)
    if "Available memory of" in text:  # the capped arena refused an allocation
        from ..deploy.onnx_session import registered_memory_cap

        cap = registered_memory_cap() or 0
        return UserError(
            f"{path}: the graph asked for more memory than the {cap / 2**30:.1f} GiB predict lets ONNX "
            f"Runtime use ({ONNX_MEMORY_SHARE:.0%} of what was available); lower --batch-size, or the "
            "file is hostile"
        )
    return UserError(f"{path}: ONNX Runtime failed on a batch of {batch} ({type(error).__name__}: {text[:200]})")


def _loaded(path: Path, kind: str, facts: dict, logits: Callable[[np.ndarray], np.ndarray]) -> LoadedModel:
    """A LoadedModel of checked ``facts`` (class names, image size, channels, resize, temperature)."""
    size, channels = facts["image_size"], facts["channels"]
    return LoadedModel(
        path, kind, facts["class_names"], size, channels, facts["resize"], facts, logits, facts["temperature"]
    )


def _missing(path: Path) -> UserError:
    return UserError(
        f"no model at {path}: run `dvc repro` to train and export one, or `dvc pull` to fetch the "
        "committed run's files from the DVC remote, or pass --model FILE "
        "(.onnx, .torchscript.pt or checkpoint.pt)"
    )


def load_onnx(path: Path, threads: int) -> LoadedModel:
    from ..deploy.onnx_session import onnx_session

    try:
        session = onnx_session(path, threads, memory_cap_bytes=int(host_available_memory() * ONNX_MEMORY_SHARE))
    except Exception as error:  # onnxruntime raises its own exception types for any damaged file
        raise UserError(f"{path}: not a loadable ONNX model ({type(error).__name__}: {str(error)[:200]})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in metadata:
        raise UserError(
            f"{path}: an ONNX model without imgcls metadata (class names, input size); export it with "
            "this pipeline (dvc repro export) or pass the checkpoint with --model data/model/checkpoint.pt"
        )
    facts = _parse_facts(path, metadata[METADATA_KEY])
    _check_declared_shapes(path, facts, session.get_inputs(), session.get_outputs())
    input_name = session.get_inputs()[0].name
    probed: list[float] = []  # seconds per image, once the probe has measured it

    def logits(images: np.ndarray) -> np.ndarray:
        limit = max(CALL_SECONDS_FLOOR, CALL_SECONDS_PER_PROBE * probed[0] * len(images)) if probed else PROBE_SECONDS
        return run_interruptibly(session, {input_name: images}, seconds=limit, path=path)

    model = _loaded(path, "onnx", facts, logits)
    probed.append(_probe(model))
    return model


def load_torchscript(path: Path, threads: int) -> LoadedModel:
    import torch

    torch.set_num_threads(threads)
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except Exception as error:  # any damaged or foreign file (the user trusts its maker, not its integrity)
        raise UserError(
            f"{path}: not a loadable TorchScript file ({type(error).__name__}: {str(error)[:200]})"
        ) from None
    if not extra[TORCHSCRIPT_EXTRA_FILE]:
        raise UserError(f"{path}: a TorchScript file without {TORCHSCRIPT_EXTRA_FILE}; export it with this pipeline")
    facts = _parse_facts(path, extra[TORCHSCRIPT_EXTRA_FILE])

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            output = module(torch.from_numpy(images))
        if not isinstance(output, torch.Tensor):
            raise UserError(f"{path}: the model returned {type(output).__name__}, not a tensor of logits")
        return output.float().numpy()

    model = _loaded(path, "torchscript", facts, logits)
    _probe(model)
    return model


def load_checkpoint_model(path: Path, threads: int) -> LoadedModel:
    import torch

    from ..model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, checkpoint = load_checkpoint(path, "cpu")
    arguments = checkpoint["arguments"]
    facts = {
        "class_names": checkpoint["class_names"],
        "image_size": arguments["image_size"],
        "channels": arguments["in_channels"],
        "resize": checked_resize(
            path, trained_resize(checkpoint), "params.data.resize", "retrain it (dvc repro train)"
        ),
        "architecture": checkpoint["architecture"],
        "temperature": checkpoint_temperature(checkpoint, str(path)),
    }

    def logits(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).float().numpy()

    return _loaded(path, "checkpoint", facts, logits)


def load_model(path: Path, *, threads: int, int8: bool = False, trust: bool = False) -> LoadedModel:
    """The model in ``path`` (.onnx, TorchScript .pt or a checkpoint .pt); ``int8`` takes the quantized ONNX
    file written beside an fp32 one (model.int8.onnx). ``trust``: the user vouches for a file format that
    can carry code (TorchScript, pickle); without it only ONNX loads."""
    path = Path(path)
    if int8 and not path.name.endswith(".int8.onnx"):
        if path.suffix != ".onnx":
            raise UserError(f"--int8 needs an ONNX model; {path} is not one")
        path = path.with_name(path.name[: -len(".onnx")] + ".int8.onnx")
    if not path.is_file():
        raise _missing(path)
    if path.suffix == ".onnx":
        return load_onnx(path, threads)
    if path.name.endswith(".torchscript.pt"):
        if not trust:
            raise UserError(
                f"{path}: a TorchScript file is a program: loading it runs code stored in it; " + TRUST_HINT
            )
        return load_torchscript(path, threads)
    if path.suffix == ".pt":
        if not trust:
            raise UserError(
                f"{path}: a checkpoint is a pickle, a format made to run code, read through torch's "
                "restricted loader; " + TRUST_HINT
            )
        return load_checkpoint_model(path, threads)
    raise UserError(f"{path}: not a model file this tool reads (.onnx, .torchscript.pt or checkpoint.pt)")
