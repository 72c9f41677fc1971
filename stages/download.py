"""download stage: get data.dataset from data.source into data/raw/, verified, atomically."""

from imgcls.cli import log, run_stage
from imgcls.archives import ArchiveLimits
from imgcls.datasets import FetchOptions, acquire
from imgcls.fileio import atomic_dir


def main() -> None:
    def body(params, paths):
        data = params.data
        with atomic_dir(paths.raw_dir) as tmp:  # a failure leaves no data/raw behind
            options = FetchOptions(retries=data.retries, timeout_s=data.timeout_s, on_bad_image=data.on_bad_image,
                                   limits=ArchiveLimits(max_bytes=int(data.max_extract_gb * 2**30)))
            acquire(data.dataset, data.source, tmp, options, log=log("download"))

    run_stage("download", body)


if __name__ == "__main__":
    main()
