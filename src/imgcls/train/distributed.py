"""Data-parallel training on torch.distributed, launched by torchrun (torch.distributed.run).

With ``train.processes: 1`` (the default) the train stage is one plain process with no process group. With
more, the stage starts ``torch.distributed.run --standalone`` itself on this machine, which runs
``python -m imgcls.train`` once per process; for several machines, users run torchrun on each node
themselves (docs/scale-out.md) and every process finds its place in the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE).

Every rank trains on its own contiguous part of each global batch (train.batch_size); DistributedDataParallel
averages the gradients, so the rate, schedule and epochs mean what they mean in one process. Only rank 0
writes anything (checkpoint, resume state, dvclive, TensorBoard, console lines). A rank that fails writes
its message where the launching stage reads it; torchrun then ends the other ranks, and the stage exits 1
with that message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from ..errors import RuntimeChoiceError, TrainingError

# A rank waiting longer than this in a collective (a peer on another machine gone silent) fails instead of
# hanging; on one machine torchrun ends the other ranks as soon as one exits with an error. The other ranks
# also wait this long while rank 0 validates and saves after each epoch: keep validation well below it.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
RANK_ERRORS_ENV = "IMGCLS_RANK_ERRORS"  # the folder where a failing rank leaves its message
PEER_LOST = ("by peer", "Connection closed", "Broken pipe")  # gloo's words when another rank has gone
PLACE_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # where torchrun puts each process
TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"  # set by torchrun (torch.distributed.run) in every process it starts
# Memory of each training process beyond its data and batch: PyTorch, its libraries, gloo and the reporters.
# Measured as the peak private memory (Private_Clean + Private_Dirty in /proc/<pid>/smaps_rollup, polled every
# 0.1 s) of each rank of `train.processes: 2` and `4` runs of the fast model on 480 12x12 images, CPU, torch
# 2.14: 373 MiB (ranks 1..3) to 478 MiB (rank 0, which also runs dvclive and TensorBoard). Shared library pages
# are not counted: they are in memory once for all processes.
PROCESS_BYTES = 480 << 20
TORCHRUN_BYTES = 300 << 20  # the torchrun launcher itself, measured the same way (299 MiB)


class LaunchError(RuntimeChoiceError):
    """Processes this machine or this environment cannot run."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.size


SINGLE = World()


def world_from_env() -> World | None:
    """The place torchrun gave this process, or None when it was not started by torchrun. RANK or WORLD_SIZE
    left in the environment by something else (a shell, a job script) is refused, as are values torchrun
    never sets: they would make this process wait for peers that never come (30 minutes) or fail deep in
    torch.distributed."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    found = ", ".join(f"{name}={os.environ[name]!r}" for name in PLACE_VARIABLES if name in os.environ)
    unset = "unset " + " ".join(name for name in PLACE_VARIABLES if name in os.environ)
    if TORCHRUN_MARK not in os.environ:
        raise LaunchError(
            f"{found} in the environment, but this process was not started by torchrun "
            f"({TORCHRUN_MARK} is not set): run `{unset}` and run again (train.processes starts "
            "torchrun itself; several machines: start torchrun on each, docs/scale-out.md)"
        )
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    except (KeyError, ValueError):
        rank = size = local_rank = local_size = -1
    if not (size >= 1 and 0 <= rank < size and 1 <= local_size <= size and 0 <= local_rank < local_size):
        raise LaunchError(
            f"{found} is not a place in a torchrun job (expected 0 <= RANK < WORLD_SIZE and "
            "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE); these are torchrun's to set: "
            f"run `{unset}` and start the stage with train.processes, or with torchrun"
        )
    if size > 1:
        # init_process_group (env://) meets its peers at MASTER_ADDR:MASTER_PORT, which torchrun always sets;
        # without them it fails deep in torch.distributed ("MASTER_ADDR expected").
        address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        if not address or not (port.isdigit() and 1 <= int(port) <= 65535):
            rendezvous = f"MASTER_ADDR={address or '(unset)'} MASTER_PORT={port or '(unset)'}"
            raise LaunchError(
                f"{found} but {rendezvous}: the {size} processes of a torchrun job meet at "
                "MASTER_ADDR:MASTER_PORT (a host, and a port in 1..65535), which torchrun sets; run "
                f"`{unset}` and start the stage with train.processes, or with torchrun"
            )
    return World(rank, size, local_rank, local_size)


def check_processes(
    processes: int, *, cores: int, available_bytes: int, data_bytes: int, gpus: int | None, emit: Callable[[str], None]
) -> None:
    """Before starting ``processes`` (train.processes) on this machine: refuse what cannot run (more
    processes than GPUs; more memory than is available: each process holds PROCESS_BYTES, plus its own copy
    of ``data_bytes`` of images kept in memory), warn where the cores are shared out too thinly.
    ``gpus``: the visible GPUs when training on CUDA, None on the CPU."""
    if gpus is not None and processes > gpus:
        raise LaunchError(
            f"train.processes = {processes} but {gpus} GPU(s) are visible: each process trains on "
            f"a GPU of its own; set train.processes to at most {gpus}"
        )
    required = processes * (PROCESS_BYTES + data_bytes) + TORCHRUN_BYTES
    if required > available_bytes:
        fits = max(1, (available_bytes - TORCHRUN_BYTES) // (PROCESS_BYTES + data_bytes))
        images = f" + {data_bytes / 2**20:,.0f} MiB of images each keeps in memory" if data_bytes else ""
        raise LaunchError(
            f"train.processes = {processes} needs about {required / 2**30:.1f} GiB ({processes} processes x "
            f"{PROCESS_BYTES >> 20} MiB for PyTorch{images}, and {TORCHRUN_BYTES >> 20} MiB for torchrun) but "
            f"{available_bytes / 2**30:.1f} GiB are available; set train.processes to at most {fits}"
            + (" or train.in_memory: never" if data_bytes else "")
        )
    if processes > cores:
        emit(
            f"warning: train.processes = {processes} on {cores} core(s): the processes take turns on the cores, "
            f"which is slower than {cores}; set train.processes to at most {cores}"
        )


def threads_per_process(requested: int, world: World) -> int:
    """``base.threads``, or this machine's cores shared out between its processes."""
    return requested or max(1, (os.cpu_count() or 1) // world.local_size)


def launch(processes: int, threads: int, emit: Callable[[str], None]) -> None:
    """Run the train stage in ``processes`` processes on this machine under torch.distributed.run and wait.
    Raises TrainingError naming the failed rank and its message when any of them fails."""
    with tempfile.TemporaryDirectory(prefix="imgcls-ranks-") as errors:
        command = torchrun_command(processes)
        per_process = threads_per_process(threads, World(size=processes, local_size=processes))
        env = dict(os.environ, **{RANK_ERRORS_ENV: errors, "OMP_NUM_THREADS": str(per_process)})
        emit(
            f"starting {processes} processes x {per_process} thread(s) with torchrun (train.processes: {processes}): "
            + " ".join(command[1:])
        )
        process = subprocess.Popen(command, env=env, preexec_fn=_end_with_parent)
        status, stopped = wait_passing_on_stops(process)
        if stopped:
            emit("stopped: torchrun ended every process; the next run resumes from the last finished epoch")
            raise SystemExit(130)
        if status != 0:
            raise rank_failure(Path(errors), processes, status)


def torchrun_command(processes: int) -> list[str]:
    """torch.distributed.run starting ``python -m imgcls.train`` in ``processes`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={processes}",
        "--max-restarts=0",
        "--module",
        "imgcls.train",
    ]


def wait_passing_on_stops(process: subprocess.Popen) -> tuple[int, bool]:
    """Wait for ``process`` (torchrun); a SIGINT or SIGTERM to this stage meanwhile is a stop for torchrun,
    which ends its ranks. Returns its exit status and whether such a stop came."""
    received = []

    def forward(signum, frame):
        received.append(signum)
        process.send_signal(signum)

    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = {sig: signal.signal(sig, forward) for sig in handled} if in_main else {}
    try:
        status = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status, bool(received)


def rank_failure(errors: Path, processes: int, status: int) -> TrainingError:
    """The error a failed torchrun job (exit ``status``) ends the stage with: the first rank's own message
    left in ``errors``, or, where none names a cause, the kill that ended a rank."""
    reports = sorted(errors.glob("rank-*.txt"), key=lambda p: p.stat().st_mtime)
    messages = [(report.stem.split("-", 1)[1], report.read_text().strip()) for report in reports]
    # A rank that lost its connection to a peer only reports the peer's end: the cause is elsewhere.
    causes = [(rank, text) for rank, text in messages if not any(s in text for s in PEER_LOST)]
    if causes:
        rank, text = causes[0]
        return TrainingError(f"rank {rank} of {processes} failed: {text}")
    return TrainingError(
        f"a training process of {processes} ended without a message (torchrun exit status "
        f'{status}): it was killed (out of memory, or a signal); torchrun\'s "Root Cause" '
        "above names its rank and signal"
        + (
            f". The others then lost their connection to it (rank {messages[0][0]}: {messages[0][1][:200]})"
            if messages
            else ""
        )
    )


def _end_with_parent() -> None:
    """In the torchrun child, before it starts: SIGTERM it when this stage dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that torchrun ends its ranks instead of training on with no one waiting."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a SIGKILL of the stage leaves torchrun to its own end
        pass


def report_failure(world: World, error: BaseException) -> None:
    """Leave this rank's message for the launching stage (first failure wins: it has the oldest file)."""
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder and world.size > 1 and not isinstance(error, (KeyboardInterrupt, SystemExit)):
        message = (
            str(error)
            if isinstance(error, TrainingError) or type(error).__module__.startswith("imgcls")
            else f"{type(error).__name__}: {error}"
        )
        try:
            (Path(folder) / f"rank-{world.rank}.txt").write_text(message)
        except OSError:
            pass


def init_process_group(world: World, device: torch.device) -> None:
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=world.rank,
        world_size=world.size,
        timeout=COLLECTIVE_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 does the body first and the others after it (a download into a shared cache happens once)."""
    if world.size > 1 and not world.is_main:
        torch.distributed.barrier()
    yield
    if world.size > 1 and world.is_main:
        torch.distributed.barrier()


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (the resume state: only rank 0 reads the file)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(values: list[float], device: torch.device, world: World) -> list[float]:
    if world.size == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (it broadcasts rank 0's weights and buffers first)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
