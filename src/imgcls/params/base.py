"""params.yaml ``base``: seed, device and threads, read by every stage that runs the network."""

from __future__ import annotations

from pydantic import Field

from .core import Section


class BaseParams(Section):
    seed: int = Field(ge=0, le=2**32 - 1)  # random, NumPy (which takes at most 2^32 - 1), torch, batch order
    device: str = Field(pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="auto, cpu, cuda or cuda:N")
    threads: int = Field(ge=0, le=1024)  # torch's intra-op threads; 0 = one per core
