"""What a download may write: data.max_extract_gb bounds the HTTP body too, against a real server on 127.0.0.1
that sends more than the limit (no Content-Length, a Content-Length that is not a number, chunked without
end, an honest Content-Length over the limit). Each is stopped within a few MiB of the limit, in seconds, with
a line naming the param, and nothing is left where the file was going."""

from __future__ import annotations

import http.server
import io
import socketserver
import tarfile
import threading
import time

import pytest
from conftest import make_image_folder

from imgcls.download import sources
from imgcls.download.archives import ArchiveLimits
from imgcls.download.fetch import fetch_file
from imgcls.errors import DataError, PermanentFetchError

CAP = 1 << 20  # the limit under test: 1 MiB
# What a server may stream before it gives up on its own: a download that ignores the limit takes all of it.
SERVER_LIMIT = 256 << 20
# Bytes a server gets out after the client stops reading: localhost socket buffers, a few MiB.
SOCKET_SLACK = 32 << 20


class FloodServer:
    """A real HTTP server on 127.0.0.1: /<mode> streams up to SERVER_LIMIT bytes of zeros, or /exact/<n> sends
    n bytes with no Content-Length. ``sent`` counts the body bytes that left it, per request."""

    def __init__(self):
        self.sent: list[int] = []
        flood = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                mode = self.path.strip("/").removesuffix(".tar")
                self.send_response(200)
                self.send_header("Connection", "close")
                total = SERVER_LIMIT
                if mode.startswith("exact/"):
                    total = int(mode.split("/")[1])
                elif mode == "honest":
                    self.send_header("Content-Length", str(SERVER_LIMIT))
                elif mode == "garbage-length":  # not a number: the client cannot rely on it
                    self.send_header("Content-Length", "a lot")
                elif mode == "chunked":
                    self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                index = len(flood.sent)
                flood.sent.append(0)
                block = bytes(64 << 10)
                try:
                    while flood.sent[index] < total:
                        piece = block[: total - flood.sent[index]]
                        if mode == "chunked":
                            self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                        else:
                            self.wfile.write(piece)
                        flood.sent[index] += len(piece)
                    if mode == "chunked":
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: what we want
                self.close_connection = True

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flood():
    server = FloodServer()
    yield server
    server.close()


def wait_for_handlers(flood, requests: int) -> None:
    """The handler thread counts what it sent until the client's hang-up reaches it."""
    deadline = time.monotonic() + 10
    while len(flood.sent) < requests and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)


@pytest.mark.parametrize(
    "mode, fragment",
    [
        ("no-length", "still sending"),
        ("garbage-length", "still sending"),
        ("chunked", "still sending"),
        ("honest", f"{SERVER_LIMIT:,} bytes (its Content-Length)"),
    ],
)
def test_a_body_over_the_limit_is_stopped_at_once_and_leaves_nothing(tmp_path, flood, mode, fragment):
    target = tmp_path / "raw"
    target.mkdir()
    started = time.monotonic()
    with pytest.raises(PermanentFetchError) as caught:
        fetch_file(
            f"{flood.base_url}/{mode}.tar",
            target / f"{mode}.tar",
            retries=3,
            timeout_s=10,
            log=lambda line: None,
            max_bytes=CAP,
        )
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert fragment in message and "data.max_extract_gb" in message and "\n" not in message
    assert list(target.iterdir()) == []  # the partial file is gone
    assert elapsed < 5, elapsed
    wait_for_handlers(flood, 1)
    assert len(flood.sent) == 1  # refused for good: the same server would send the same again
    assert flood.sent[0] < SOCKET_SLACK, flood.sent  # the client stopped reading, not the server sending


def test_the_limit_is_exact(tmp_path, flood):
    fetch_file(f"{flood.base_url}/exact/{CAP}", tmp_path / "at-limit", retries=1, timeout_s=10, max_bytes=CAP)
    assert (tmp_path / "at-limit").read_bytes() == bytes(CAP)
    with pytest.raises(PermanentFetchError, match="still sending"):
        fetch_file(f"{flood.base_url}/exact/{CAP + 1}", tmp_path / "over", retries=1, timeout_s=10, max_bytes=CAP)
    assert not (tmp_path / "over").exists()


def test_the_download_stage_takes_its_cap_from_max_extract_gb(tmp_path, flood, http_server):
    """Through acquire() (what the stage runs): the flood is refused with ArchiveLimits.max_bytes as the cap,
    and an archive within it still downloads and extracts."""
    options = sources.FetchOptions(retries=2, timeout_s=10, limits=ArchiveLimits(max_bytes=CAP))
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(
        DataError, match=r"over 1,048,576 bytes and still sending, over the 0.000977 GiB \(data.max_extract"
    ):
        sources.acquire("imagefolder", f"{flood.base_url}/no-length.tar", raw, options, log=lambda line: None)
    assert list(raw.iterdir()) == []
    wait_for_handlers(flood, 1)
    assert flood.sent[0] < SOCKET_SLACK

    buffer = io.BytesIO()
    folder = make_image_folder(tmp_path / "images", ["cat", "dog"], per_class=3)
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=".")
    assert len(buffer.getvalue()) < CAP
    url = http_server.add("images.tar.gz", buffer.getvalue())
    provenance = sources.acquire("imagefolder", url, raw, options, log=lambda line: None)
    assert provenance["files"]["images.tar.gz"]["bytes"] == len(buffer.getvalue())
    extracted = {p.relative_to(raw / "images") for p in (raw / "images").rglob("*") if p.is_file()}
    assert extracted == {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} and len(extracted) == 12
