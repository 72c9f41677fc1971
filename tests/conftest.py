"""Shared fixtures: small data sets written by the tests, and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import socketserver
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

sys.path.append(str(REPO_ROOT / "bench"))  # after the project's own paths: bench's modules shadow nothing
from common import merge_params as merge  # noqa: E402 (the one params merge: tests and benchmarks share it)


def committed_params_raw() -> dict:
    from imgcls.params.core import read_yaml

    return read_yaml(REPO_ROOT / "params.yaml")


def real_params(**sections):
    """The committed params.yaml, shrunk or changed by ``sections``, validated like a stage validates it, with
    the recipe keys left at auto resolved as the train stage resolves them: tests train on the project's real
    recipe, not on defaults of their own."""
    from imgcls.params.project import parse_params
    from imgcls.params.train import params_with_recipe

    return params_with_recipe(parse_params(merge(committed_params_raw(), sections)))


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_fashion_like(folder: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict:
    """Four IDX .gz files in Fashion-MNIST's names; returns the expected-checksum table for them."""
    from imgcls.datasets import ExpectedIdx

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        # Class c is a bright horizontal band at rows 2c..2c+4 plus noise: learnable, not trivial.
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 5, :] += 180
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte.gz"
            content = idx_bytes(np.asarray(array))
            (folder / name).write_bytes(gzip.compress(content))
            expected[name] = ExpectedIdx(hashlib.sha256(content).hexdigest(), len(content))
    return expected


def cifar_records(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return np.concatenate([labels[:, None], pixels], axis=1).tobytes()


def make_cifar_archive(path: Path, records_per_file: int = 10000) -> str:
    """A cifar-10-binary.tar.gz in the official layout; returns its md5."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
        for seed, name in enumerate(names):
            add_bytes(tar, f"cifar-10-batches-bin/{name}", cifar_records(records_per_file, seed))
        add_bytes(
            tar,
            "cifar-10-batches-bin/batches.meta.txt",
            b"airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n",
        )
    path.write_bytes(buffer.getvalue())
    return hashlib.md5(buffer.getvalue()).hexdigest()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_image_folder(
    root: Path, classes=("ants", "bees"), per_class: int = 6, splits=("train", "test"), size: int = 20, noise: int = 0
) -> Path:
    """A tiny ants/bees-style folder: each class a distinct colour (plus uniform noise of +-``noise``, so
    patches vary as in photos), mixed sizes and modes."""
    colours = [(200, 40, 40), (40, 40, 200), (40, 200, 40), (200, 200, 40)]
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size + 2 * i, size + i, 3)
                pixels = np.array(colours[c % len(colours)]) + rng.integers(-noise, noise + 1, shape)
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                if i % 3 == 1:
                    image.convert("L").save(folder / f"{i}.png")
                elif i % 3 == 2:
                    image.convert("RGBA").save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=95)
    return root


def make_tar(path: Path, root: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name)
    return path


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> list of behaviours consumed one per request: "ok", "404", "500", "drop"
    behaviours: dict[str, list[str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)


class TestServer:
    def __init__(self, state: ServerState, port: int):
        self.state = state
        self.base_url = f"http://127.0.0.1:{port}"

    def add(self, name: str, data: bytes, *behaviours: str) -> str:
        self.state.files["/" + name] = data
        self.state.behaviours["/" + name] = list(behaviours)
        return f"{self.base_url}/{name}"

    def requests_for(self, name: str) -> int:
        return sum(1 for r in self.state.requests if r == "/" + name)


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 (random port) serving bytes the test registers."""
    state = ServerState()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            path = self.path.split("?", 1)[0]
            state.requests.append(path)
            queue = state.behaviours.get(path, [])
            behaviour = queue.pop(0) if queue else "ok"
            data = state.files.get(path)
            if data is None or behaviour == "404":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if behaviour == "500":
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
            self.end_headers()
            if not body:
                return
            if behaviour == "drop":  # send half, then hang up: a connection dropped mid-file
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield TestServer(state, server.server_address[1])
    server.shutdown()
    server.server_close()


def unused_local_url() -> str:
    """A 127.0.0.1 URL on a port nobody listens on (connection refused, like a host that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data"


@pytest.fixture
def one_thread():
    """torch on one thread for the test (then as it was). The test machines share two cores between workers:
    two OpenMP threads that wait on each other made small training steps 7-20x slower (0.5 s instead of
    0.027 s a step; fold training 55 s instead of 8 s). One thread is fast and predictable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def near_copy(picture, variant: int):
    """A typical edited copy of a PIL picture: JPEG re-save at quality 60 (0), shrunk by 10% (1; decoding
    resizes it back), 10% brighter (2), one pixel of the left and top border cropped (3), or a mix of JPEG and
    8% darker (4)."""
    from PIL import ImageEnhance

    size = picture.size[0]
    if variant == 0:
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if variant == 1:
        return picture.resize((round(size * 0.9),) * 2, Image.BILINEAR)
    if variant == 2:
        return ImageEnhance.Brightness(picture).enhance(1.1)
    if variant == 3:
        return picture.crop((1, 1, size, size))
    return ImageEnhance.Brightness(near_copy(picture, 0)).enhance(0.92)
