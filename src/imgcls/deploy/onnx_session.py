"""One way to open an ONNX model with ONNX Runtime, for the export stage and for `imgcls predict`, and to run
one over many images. Light on purpose (no torch import), so predict starts fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .batches import in_batches

# ONNX Runtime's allocators belong to its process-wide environment: a capped one is registered once per process.
_registered_cap: list[int] = []


def onnx_session(path: Path, threads: int | None = None, *, memory_cap_bytes: int | None = None):
    """An ONNX Runtime session on the CPU; ``threads`` caps its intra-op threads (None: the runtime's choice).
    ``memory_cap_bytes``: the session allocates from an arena that refuses to grow past this many bytes, so a
    graph (a stranger's file) that asks for more fails with an error instead of taking the machine's memory."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Only fatal messages: the runtime's own log lines carry the graph's node names, which a crafted file can
    # fill with terminal escape sequences; its errors reach the caller as exceptions anyway.
    options.log_severity_level = 4
    if memory_cap_bytes is not None:
        if not _registered_cap:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            # arena_extend_strategy 1 (same as requested): grow by what is asked, so the cap is reached exactly.
            ort.create_and_register_allocator(
                info, ort.OrtArenaCfg({"max_mem": int(memory_cap_bytes), "arena_extend_strategy": 1})
            )
            _registered_cap.append(int(memory_cap_bytes))
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def registered_memory_cap() -> int | None:
    """The cap of this process's shared ONNX Runtime arena, once one is registered."""
    return _registered_cap[0] if _registered_cap else None


def onnx_logits(path: Path, images, threads: int | None = None) -> np.ndarray:
    """Logits of the imgcls ONNX model at ``path`` for ``images`` (N, C, H, W): uint8, or float32 in [0, 1];
    an array or an NpyReader, read batch by batch."""
    session = onnx_session(path, threads)

    def run(batch: np.ndarray) -> np.ndarray:
        if batch.dtype == np.uint8:
            batch = batch.astype(np.float32) / 255
        return session.run(None, {"images": batch})[0]

    return in_batches(run, images)
