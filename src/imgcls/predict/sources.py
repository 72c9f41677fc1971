"""What `imgcls predict` reads: image files, folders (recursively), glob patterns, archives (extracted
under the download stage's safety rules), video files (PyAV, every Nth frame) and a camera.

Each source yields ``Item``s: a name (a path, ``video.mp4#frame=120``, ``archive.zip:member.png``), the
true class where a labelled folder (``<class>/<images>``) says it, and either the model input or the
reason it could not be read. Pictures become model input through the preprocess stage's own functions
(``decode_image`` for files, ``prepare_image`` for decoded frames), so predict sees what training saw."""

from __future__ import annotations

import glob
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..datasets import IMAGE_SUFFIXES
from ..download.archives import ArchiveLimits, extract_archive, is_archive
from ..errors import DataError, UserError
from ..preprocess.images import DECODE_ERRORS, decode_image, prepare_image
from ..preprocess.imagefolder import is_hidden

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
MAX_PIXELS = 178_956_970  # Pillow's own decompression-bomb limit: a picture larger than that is refused
ARCHIVE_MAX_BYTES = 20 << 30
FILES_PER_TASK = 256  # images decoded per worker task


@dataclass
class Item:
    name: str
    label: int | None  # index into the model's classes, from a labelled folder
    image: np.ndarray | None  # uint8 (C, H, W) at the model's input size
    error: str | None = None


@dataclass
class FileJob:
    path: Path
    name: str
    label: int | None


def _image_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):  # os.walk does not follow links to folders
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        files += [Path(root) / n for n in sorted(names)
                  if not is_hidden(n) and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return files


def _folder_jobs(folder: Path, class_names: list[str], shown_as: str | None = None) -> list[FileJob]:
    """Every image under ``folder``; labelled when each top-level subfolder is one of the model's classes."""
    subfolders = [d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name)]
    labelled = bool(subfolders) and set(subfolders) <= set(class_names)
    jobs = []
    for path in _image_files(folder):
        relative = path.relative_to(folder)
        label = class_names.index(relative.parts[0]) if labelled and len(relative.parts) > 1 else None
        name = f"{shown_as}:{relative.as_posix()}" if shown_as else str(path)
        jobs.append(FileJob(path, name, label))
    return jobs


def is_video(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def plan_sources(sources: list[str], class_names: list[str], scratch: Path) -> list[FileJob | Path]:
    """Expand SOURCE arguments into image jobs and video paths, in the order given. Archives are extracted
    into ``scratch``. A source that names nothing is an error before any work."""
    planned: list[FileJob | Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            jobs = _folder_jobs(path, class_names)
            if not jobs:
                raise UserError(f"{source}: a folder without images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            planned += jobs
        elif path.is_file() and is_archive(path.name):
            target = Path(tempfile.mkdtemp(prefix="archive-", dir=scratch))
            try:
                extract_archive(path, target, ArchiveLimits(max_bytes=ARCHIVE_MAX_BYTES))
            except DataError as error:
                raise UserError(str(error)) from None
            planned += _folder_jobs(target, class_names, shown_as=str(path))
        elif path.is_file() and is_video(path):
            planned.append(path)
        elif path.is_file():
            planned.append(FileJob(path, str(path), None))  # any suffix: the decoder decides
        elif any(ch in source for ch in "*?["):
            matches = sorted(glob.glob(source, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise UserError(f"{source}: the pattern matches no image files")
            planned += [FileJob(f, str(f), None) for f in files]
        else:
            raise UserError(f"{source}: no such file or folder")
    return planned


def _decode_files(jobs: list[tuple[str, str, int | None]], image_size: int, channels: int) -> list[Item]:
    items = []
    for path, name, label in jobs:
        try:
            items.append(Item(name, label, decode_image(path, image_size=image_size, channels=channels,
                                                        max_pixels=MAX_PIXELS)))
        except DECODE_ERRORS as error:
            items.append(Item(name, label, None, f"{type(error).__name__}: {error}"))
    return items


def decode_jobs(jobs: list[FileJob], *, image_size: int, channels: int, workers: int) -> Iterator[Item]:
    """Decode image files in order; with ``workers`` > 1 on a process pool, a few tasks ahead."""
    tasks = [[(str(j.path), j.name, j.label) for j in jobs[i:i + FILES_PER_TASK]]
             for i in range(0, len(jobs), FILES_PER_TASK)]
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield from _decode_files(task, image_size, channels)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = []
        for task in tasks:
            pending.append(pool.submit(_decode_files, task, image_size, channels))
            if len(pending) > 2 * workers:
                yield from pending.pop(0).result()
        for future in pending:
            yield from future.result()


def _picture(frame) -> Image.Image:
    """A decoded video frame as an RGB picture: the same pixels as PyAV's ``frame.to_image()`` (FFmpeg's
    conversion to rgb24), without its blank-image fill (a quarter of a 640x480 frame's time)."""
    return Image.fromarray(frame.to_ndarray(format="rgb24"))


def video_frames(path: Path, *, image_size: int, channels: int, every: int, threads: int) -> Iterator[Item]:
    """Every ``every``-th frame of a video file, decoded by PyAV (FFmpeg)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as error:
        raise UserError(f"{path}: not a readable video ({error})") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.codec_context.thread_count = threads
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                image = prepare_image(_picture(frame), image_size=image_size, channels=channels)
                yield Item(f"{path}#frame={index}", None, image)
        except av.error.FFmpegError as error:
            yield Item(f"{path}#frame=?", None, None, f"video decoding stopped: {error}")


def camera_frames(camera: int, *, image_size: int, channels: int, every: int, limit: int | None) -> Iterator[Item]:
    """Frames of camera ``camera`` (/dev/video<N>, through FFmpeg's video4linux2 input)."""
    import av

    device = f"/dev/video{camera}"
    if not os.path.exists(device):
        present = sorted(glob.glob("/dev/video*"))
        raise UserError(f"camera {camera} ({device}) does not exist on this machine; "
                        + (f"cameras found: {', '.join(present)}" if present else "no camera was found (no /dev/video*)"))
    try:
        container = av.open(device, format="v4l2")
    except (av.error.FFmpegError, OSError) as error:
        raise UserError(f"camera {camera} ({device}) cannot be opened: {error}") from None
    with container:
        for index, frame in enumerate(container.decode(video=0)):
            if limit is not None and index >= limit * every:
                break
            if index % every == 0:
                yield Item(f"camera{camera}#frame={index}", None,
                           prepare_image(_picture(frame), image_size=image_size, channels=channels))
