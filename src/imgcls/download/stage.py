"""download stage: get data.dataset from data.source into data/raw/, verified, atomically."""

from __future__ import annotations

from ..cli import log
from ..fileio import atomic_dir
from ..params.data import DownloadStageParams as Params
from ..paths import ProjectPaths
from .archives import ArchiveLimits
from .sources import FetchOptions, acquire


def download(params: Params, paths: ProjectPaths) -> None:
    data = params.data
    options = FetchOptions(
        retries=data.retries,
        timeout_s=data.timeout_s,
        on_bad_image=data.on_bad_image,
        limits=ArchiveLimits(max_bytes=int(data.max_extract_gb * 2**30)),
    )
    with atomic_dir(paths.raw_dir, clean_stale=True) as tmp:  # a failure leaves no data/raw behind
        acquire(data.dataset, data.source, tmp, options, log=log("download"))
