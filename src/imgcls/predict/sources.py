"""What `imgcls predict` reads: image files, folders (recursively), glob patterns, archives (extracted
under the download stage's safety rules), video files (PyAV, every Nth frame) and a camera.

Each source yields ``Item``s: a name (a path, ``video.mp4#frame=120``, ``archive.zip:member.png``), the
true class where a labelled folder (``<class>/<images>``) says it, and either the model input or the
reason it could not be read. Only regular files are opened (a FIFO named ``p.png`` would block forever);
links to folders are never followed inside a folder or a ``**`` pattern (a link to an ancestor makes the
walk endless), and each one skipped is reported as an item, as is a folder that cannot be listed.
Pictures become model input through the preprocess stage's own functions
(``decode_image`` for files, ``prepare_image`` for decoded frames), made square the way the model's training
images were (``resize``: squash, crop or pad, from the model file), so predict sees what training saw."""

from __future__ import annotations

import fnmatch
import glob
import os
import signal
import stat
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..datasets import IMAGE_SUFFIXES
from ..download.archives import ArchiveLimits, extract_archive, is_archive
from ..errors import DataError, UserError
from ..manifest import is_hidden
from ..prefetch import prefetched
from ..preprocess.images import DECODE_ERRORS, decode_image, prepare_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
# FFmpeg picks a demuxer by content, not by name: a ".mp4" that is a concat script or an HLS playlist would make
# it open other files (a FIFO beside it blocks for ever). Only the containers of VIDEO_SUFFIXES, reading the
# one local file, are allowed.
VIDEO_OPEN_OPTIONS = {"format_whitelist": "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,m4v", "protocol_whitelist": "file"}
MAX_FOLDER_DEPTH = 64  # image folders are a few levels deep; Python 3.11's os.walk recurses (1,000 levels crash it)
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


@dataclass
class Skipped:
    """Something found while expanding a source that is not read: reported like an unreadable image."""

    name: str
    reason: str


def is_regular_file(path: str | Path) -> bool:
    """A regular file (through links): never a FIFO, device or socket, which can block or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def walk_folders(top: Path, skipped: list[Skipped]) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) for ``top`` and every folder below it, depth first and sorted, hidden names
    left out. Links to folders are not followed, and each is added to ``skipped``, as are folders that cannot be
    listed and folders deeper than MAX_FOLDER_DEPTH. Iterative: no recursion limit to hit."""
    stack = [(top, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append(Skipped(str(folder), f"cannot list this folder ({error.strerror or error})"))
            continue
        files, subfolders = [], []
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(Path(entry.path))
            elif entry.is_symlink() and entry.is_dir():
                skipped.append(
                    Skipped(entry.path, "a link to a folder: not followed (give the folder it points to as a SOURCE)")
                )
            else:
                files.append(entry.name)
        yield folder, files
        if subfolders and depth + 1 > MAX_FOLDER_DEPTH:
            skipped.append(Skipped(str(subfolders[0]), f"folders nested more than {MAX_FOLDER_DEPTH} deep: not read"))
            continue
        stack += [(sub, depth + 1) for sub in reversed(subfolders)]


def _walk_images(folder: Path) -> tuple[list[Path], list[Skipped]]:
    """Image files under ``folder`` (sorted, hidden names left out), and what was skipped."""
    skipped: list[Skipped] = []
    files = [
        root / name
        for root, names in walk_folders(folder, skipped)
        for name in names
        if Path(name).suffix.lower() in IMAGE_SUFFIXES
    ]
    return files, skipped


def _folder_jobs(
    folder: Path, class_names: list[str], shown_as: str | None = None
) -> tuple[list[FileJob], list[Skipped]]:
    """Every image under ``folder``; labelled when each top-level subfolder is one of the model's classes."""
    try:
        subfolders = [d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d.name)]
    except OSError as error:
        raise UserError(f"{folder}: cannot list this folder ({error.strerror or error})") from None
    labelled = bool(subfolders) and set(subfolders) <= set(class_names)
    files, skipped = _walk_images(folder)
    jobs = []
    for path in files:
        relative = path.relative_to(folder)
        label = class_names.index(relative.parts[0]) if labelled and len(relative.parts) > 1 else None
        name = f"{shown_as}:{relative.as_posix()}" if shown_as else str(path)
        jobs.append(FileJob(path, name, label))
    return jobs, skipped


def _has_magic(part: str) -> bool:
    return any(ch in part for ch in "*?[")


def glob_images(pattern: str) -> list[Path]:
    """Image files matching ``pattern`` (glob syntax, ``**`` for any depth), sorted. Unlike ``glob.glob``,
    ``**`` never descends through a link to a folder, so links to an ancestor cannot make the walk endless;
    hidden names match only a part that starts with a dot, as in glob."""
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if _has_magic(part)), len(parts))
    bases = [Path(*parts[:first]) if first else Path(".")]
    for part in parts[first:]:
        matched: list[Path] = []
        for base in bases:
            if part == "**":  # this folder and every folder below it, links to folders not followed
                if base.is_dir() and not base.is_symlink() or base == Path("."):
                    matched += [root for root, _ in walk_folders(base, [])]
                elif base.is_dir():  # a link named in the pattern itself: its own folder, nothing below
                    matched.append(base)
            elif _has_magic(part):
                try:
                    names = sorted(os.listdir(base))
                except OSError:
                    continue
                matched += [
                    base / n
                    for n in names
                    if fnmatch.fnmatchcase(n, part) and (part.startswith(".") or not n.startswith("."))
                ]
            elif (base / part).exists() or (base / part).is_symlink():
                matched.append(base / part)
        bases = list(dict.fromkeys(matched))  # "**/**" would list a folder twice
    return sorted(p for p in bases if p.suffix.lower() in IMAGE_SUFFIXES and is_regular_file(p))


def is_video(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_SUFFIXES)


def plan_sources(sources: list[str], class_names: list[str], scratch: Path) -> list[FileJob | Skipped | Path]:
    """Expand SOURCE arguments into image jobs, skipped entries and video paths, in the order given. Archives
    are extracted into ``scratch``. A source that names nothing is an error before any work."""
    planned: list[FileJob | Skipped | Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            jobs, skipped = _folder_jobs(path, class_names)
            if not jobs:
                raise UserError(
                    f"{source}: a folder without images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                    + (
                        f"; {len(skipped)} link(s) or unreadable folder(s) skipped, first {skipped[0].name}"
                        if skipped
                        else ""
                    )
                )
            planned += skipped + jobs
        elif path.exists() and not is_regular_file(path):
            raise UserError(f"{source}: not a regular file (a FIFO, device or socket); give image files or folders")
        elif path.is_file() and is_archive(path.name):
            target = Path(tempfile.mkdtemp(prefix="archive-", dir=scratch))
            try:
                extract_archive(path, target, ArchiveLimits(max_bytes=ARCHIVE_MAX_BYTES))
            except DataError as error:
                raise UserError(str(error)) from None
            jobs, skipped = _folder_jobs(target, class_names, shown_as=str(path))
            if not jobs:
                raise UserError(f"{source}: an archive without images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            planned += jobs
        elif path.is_file() and is_video(path):
            planned.append(path)
        elif path.is_file():
            planned.append(FileJob(path, str(path), None))  # any suffix: the decoder decides
        elif _has_magic(source):
            files = glob_images(source)
            if not files:
                raise UserError(f"{source}: the pattern matches no image files")
            planned += [FileJob(f, str(f), None) for f in files]
        else:
            raise UserError(f"{source}: no such file or folder")
    return planned


def _decode_files(jobs: list[tuple[str, str, int | None]], image_size: int, channels: int, resize: str) -> list[Item]:
    items = []
    for path, name, label in jobs:
        if not is_regular_file(path):  # checked again here: the file may have been swapped since the listing
            items.append(Item(name, label, None, "not a regular file (a FIFO, device or socket, or gone)"))
            continue
        try:
            image = decode_image(path, image_size=image_size, channels=channels, max_pixels=MAX_PIXELS, resize=resize)
            items.append(Item(name, label, image))
        except DECODE_ERRORS as error:
            items.append(Item(name, label, None, f"{type(error).__name__}: {error}"))
    return items


def _worker_start() -> None:
    # Ctrl-C, SIGTERM and SIGHUP are the parent's to handle: it cancels the work, cleans up and says so once
    # (a worker inheriting the parent's handlers would raise in the middle of a task instead).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def decode_jobs(
    jobs: list[FileJob], *, image_size: int, channels: int, workers: int, resize: str = "squash"
) -> Iterator[Item]:
    """Decode image files in order, made square by ``resize``; with ``workers`` > 1 on a process pool (no more
    processes than tasks or cores), a few tasks ahead."""
    tasks = [
        [(str(j.path), j.name, j.label) for j in jobs[i : i + FILES_PER_TASK]]
        for i in range(0, len(jobs), FILES_PER_TASK)
    ]
    workers = min(workers, len(tasks), os.cpu_count() or 1)
    if workers <= 1:
        for task in tasks:
            yield from _decode_files(task, image_size, channels, resize)
        return
    pool = ProcessPoolExecutor(workers, initializer=_worker_start)
    try:
        arguments = ((task, image_size, channels, resize) for task in tasks)
        for items in prefetched(pool, _decode_files, arguments, ahead=2 * workers):
            yield from items
    except BrokenProcessPool:
        raise UserError(
            f"an image-decoding worker process died (killed by a signal, or out of memory) while "
            f"decoding the images from {jobs[0].name} on; nothing after that was predicted"
        ) from None
    finally:  # an error or a stop: drop the queued work instead of decoding it first
        pool.shutdown(wait=True, cancel_futures=True)


def _picture(frame) -> Image.Image:
    """A decoded video frame as an RGB picture: the same pixels as PyAV's ``frame.to_image()`` (FFmpeg's
    conversion to rgb24), without its blank-image fill (a quarter of a 640x480 frame's time)."""
    return Image.fromarray(frame.to_ndarray(format="rgb24"))


def video_frames(
    path: Path, *, image_size: int, channels: int, every: int, threads: int, resize: str = "squash"
) -> Iterator[Item]:
    """Every ``every``-th frame of a video file, decoded by PyAV (FFmpeg), made square by ``resize``."""
    import av

    try:
        container = av.open(str(path), options=VIDEO_OPEN_OPTIONS)
    except (av.error.FFmpegError, OSError) as error:
        raise UserError(
            f"{path}: not a readable video ({error}); predict reads MP4/MOV, Matroska/WebM and AVI files"
        ) from None
    with container:
        if not container.streams.video:
            raise UserError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.codec_context.thread_count = threads
        frames = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % every:
                    continue
                image = prepare_image(_picture(frame), image_size=image_size, channels=channels, resize=resize)
                frames += 1
                yield Item(f"{path}#frame={index}", None, image)
        except av.error.FFmpegError as error:
            yield Item(f"{path}#frame=?", None, None, f"video decoding stopped: {error}")
            return
        if not frames:
            yield Item(f"{path}", None, None, "no frame could be decoded from this video")


def camera_frames(
    camera: int, *, image_size: int, channels: int, every: int, limit: int | None, resize: str = "squash"
) -> Iterator[Item]:
    """Frames of camera ``camera`` (/dev/video<N>, through FFmpeg's video4linux2 input), made square by
    ``resize``."""
    import av

    device = f"/dev/video{camera}"
    if not os.path.exists(device):
        present = sorted(glob.glob("/dev/video*"))
        raise UserError(
            f"camera {camera} ({device}) does not exist on this machine; "
            + (f"cameras found: {', '.join(present)}" if present else "no camera was found (no /dev/video*)")
        )
    try:
        container = av.open(device, format="v4l2")
    except (av.error.FFmpegError, OSError) as error:
        raise UserError(f"camera {camera} ({device}) cannot be opened: {error}") from None
    with container:
        for index, frame in enumerate(container.decode(video=0)):
            if limit is not None and index >= limit * every:
                break
            if index % every == 0:
                yield Item(
                    f"camera{camera}#frame={index}",
                    None,
                    prepare_image(_picture(frame), image_size=image_size, channels=channels, resize=resize),
                )
