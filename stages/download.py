"""download stage: get data.dataset from data.source into data/raw/, verified, atomically."""

from imgcls.cli import log, run_stage
from imgcls.datasets import acquire
from imgcls.fileio import atomic_dir


def main() -> None:
    def body(params, paths):
        data = params.data
        with atomic_dir(paths.raw_dir) as tmp:  # a failure leaves no data/raw behind
            acquire(data.dataset, data.source, tmp, retries=data.retries, timeout_s=data.timeout_s,
                    log=log("download"))

    run_stage("download", body)


if __name__ == "__main__":
    main()
