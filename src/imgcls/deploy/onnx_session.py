"""One way to open an ONNX model with ONNX Runtime, for the export stage and for `imgcls predict`. Light on
purpose (no torch import), so predict starts fast."""

from __future__ import annotations

from pathlib import Path


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU; ``threads`` caps its intra-op threads (None: the runtime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about the graph say nothing a user of a stage can act on
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
