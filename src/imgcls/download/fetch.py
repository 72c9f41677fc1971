"""Getting files from a source: local paths, HTTP(S) URLs with bounded retries, and source lists.

A *location* is a local file, a local folder or a URL. A *source list* is a ``.txt`` file naming
locations one per line (``#`` starts a comment); they are tried in order until one yields every file
with the right checksum. Relative paths in a source list are relative to the list's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, PermanentFetchError
from ..report import progress_bar

CHUNK_BYTES = 1 << 20


def is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme in ("http", "https")


def read_source_list(path: Path) -> list[str]:
    """Locations from a source list, relative paths resolved against the list's folder."""
    locations = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if not is_url(line) and not Path(line).is_absolute():
            line = str((path.parent / line).resolve())
        locations.append(line)
    if not locations:
        raise DataError(f"source list {path} names no location; add a path or URL per line")
    return locations


def expand_source(source: str) -> list[str]:
    """The locations to try for ``data.source``: a source list expands, anything else is one location."""
    if not is_url(source) and source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data.source: source list {source} does not exist")
        return read_source_list(path)
    return [source]


def join_location(location: str, filename: str) -> str:
    """``filename`` inside a folder location (URL or path)."""
    if is_url(location):
        return location.rstrip("/") + "/" + urllib.parse.quote(filename)
    return str(Path(location) / filename)


class ByteProgress:
    """Bytes moved, as a progress bar with rate and time left on a terminal; nothing when output is captured."""

    def __init__(self, label: str):
        self.bar = progress_bar(None, unit="B", label=label)
        if self.bar is not None:
            self.bar.unit_scale, self.bar.unit_divisor = True, 1024

    def __call__(self, new_bytes: int) -> None:
        if self.bar is not None:
            self.bar.update(new_bytes)

    def received(self, received: int, expected: int | None) -> None:
        """fetch_file's callback: ``received`` bytes so far of ``expected`` (None when unknown)."""
        if self.bar is not None:
            if expected and self.bar.total != expected:
                self.bar.total = expected
            self.bar.update(received - self.bar.n)


@contextlib.contextmanager
def byte_progress(label: str) -> Iterator[ByteProgress]:
    progress = ByteProgress(label)
    try:
        yield progress
    finally:
        if progress.bar is not None:
            progress.bar.close()


@dataclass(frozen=True)
class Digest:
    sha256: str
    md5: str
    size: int


def digest_file(path: Path) -> Digest:
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return Digest(sha.hexdigest(), md5.hexdigest(), size)


def _too_large(url: str, size: str, max_bytes: int) -> PermanentFetchError:
    return PermanentFetchError(
        f"{url} is {size}, over the {max_bytes / 2**30:.3g} GiB (data.max_extract_gb) a download may write; "
        "raise data.max_extract_gb if that is the right file, or point data.source at another copy"
    )


def _download_once(
    url: str,
    dest: Path,
    timeout_s: float,
    progress: Callable[[int, int | None], None] | None,
    max_bytes: int | None = None,
) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "imgcls"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
            expected = response.headers.get("Content-Length")
            expected_bytes = int(expected) if expected and expected.isdigit() else None
            if max_bytes is not None and expected_bytes is not None and expected_bytes > max_bytes:
                raise _too_large(url, f"{expected_bytes:,} bytes (its Content-Length)", max_bytes)
            received = 0
            while True:
                # Never more than one byte past the cap: a body with no Content-Length (or sent chunked) is
                # stopped there, not when the disk is full.
                chunk = response.read(CHUNK_BYTES if max_bytes is None else min(CHUNK_BYTES, max_bytes + 1 - received))
                if not chunk:
                    break
                received += len(chunk)
                if max_bytes is not None and received > max_bytes:
                    raise _too_large(url, f"over {max_bytes:,} bytes and still sending", max_bytes)
                out.write(chunk)
                if progress:
                    progress(received, expected_bytes)
            if expected_bytes is not None and received != expected_bytes:
                raise DataError(f"connection to {url} dropped after {received} of {expected_bytes} bytes")
    except urllib.error.HTTPError as error:
        if 400 <= error.code < 500 and error.code not in (408, 429):
            raise PermanentFetchError(f"HTTP {error.code} {error.reason} for {url}") from None
        raise DataError(f"HTTP {error.code} {error.reason} for {url}") from None
    except urllib.error.URLError as error:
        raise DataError(f"cannot reach {url}: {error.reason}") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
        # IncompleteRead, RemoteDisconnected and resets: the connection dropped mid-file.
        raise DataError(f"connection to {url} dropped mid-file ({type(error).__name__}: {error})") from None


def fetch_file(
    location: str,
    dest: Path,
    *,
    retries: int,
    timeout_s: float,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int | None], None] | None = None,
    max_bytes: int | None = None,
) -> None:
    """Copy or download one file to ``dest``; URLs get up to ``retries`` attempts with a short back-off.
    A download larger than ``max_bytes`` is refused (by its Content-Length before reading, else as soon as its
    body passes the cap) and nothing of it is left at ``dest``; a local file is copied whole (its size is known
    and extraction bounds what it unpacks to)."""
    if not is_url(location):
        path = Path(location)
        if not path.is_file():
            raise PermanentFetchError(f"{location} does not exist or is not a file")
        with open(path, "rb") as source, open(dest, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
                if progress:
                    progress(out.tell(), None)
        return
    last_error: DataError | None = None
    for attempt in range(1, retries + 1):
        try:
            _download_once(location, dest, timeout_s, progress, max_bytes)
            return
        except PermanentFetchError:
            dest.unlink(missing_ok=True)  # a half-written file is nothing anyone can use
            raise
        except DataError as error:
            dest.unlink(missing_ok=True)
            last_error = error
            if attempt < retries:
                log(f"download: attempt {attempt}/{retries} failed: {error}; retrying")
                time.sleep(min(0.2 * 2**attempt, 5.0))
    raise DataError(f"{last_error} (gave up after {retries} attempts)")
