"""Where every artifact lives, relative to the project root. dvc.yaml names the same paths; a test
(tests/test_project_structure.py) checks that the two agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProjectPaths:
    root: Path

    @property
    def params_stamp(self) -> Path:  # validate stage: written only when params.yaml passed validation
        return self.root / "data" / "params-valid.txt"

    @property
    def raw_dir(self) -> Path:  # verified downloads (download stage)
        return self.root / "data" / "raw"

    @property
    def prepared_dir(self) -> Path:  # uint8 tensors + meta.json (preprocess stage)
        return self.root / "data" / "prepared"

    @property
    def decode_cache_dir(self) -> Path:  # preprocess: decoded images by content hash (not a DVC output; safe to delete)
        return self.root / "data" / "cache" / "decoded"

    @property
    def audit_dir(self) -> Path:  # duplicates stage: every pair found, by split and row (for evaluate)
        return self.root / "data" / "audit"

    @property
    def model_dir(self) -> Path:  # checkpoint (train stage)
        return self.root / "data" / "model"

    @property
    def checkpoint(self) -> Path:
        return self.model_dir / "checkpoint.pt"

    @property
    def resume_state(self) -> Path:  # train stage: state after the last finished epoch (not a DVC output)
        return self.root / "data" / "train-resume" / "state.pt"

    @property
    def train_log_dir(self) -> Path:  # dvclive output (train stage): metrics/train/metrics.json and plots/
        return self.root / "metrics" / "train"

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / "data" / "tensorboard"

    def stage_tensorboard_dir(self, stage: str) -> Path:
        """A stage's pictures and figures as a TensorBoard run (`tensorboard --logdir data` shows them all)."""
        return self.root / "data" / f"tensorboard-{stage.replace('_', '-')}"

    @property
    def export_dir(self) -> Path:
        return self.root / "data" / "export"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"
