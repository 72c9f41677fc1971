"""The benchmark's accounting: FLOPs per training image, and the verdict on each of issue 14's targets.
A wrong count or a wrong verdict would put wrong figures in docs/performance.md."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO_ROOT, merge

sys.path.insert(0, str(REPO_ROOT / "bench"))

import flops  # noqa: E402
import run  # noqa: E402


def test_flops_per_training_image_of_lenet_match_the_hand_count():
    # One-channel LeNet on 28x28: forward = conv1 24*24*25*1*6 + conv2 8*8*25*6*16 + fc 256*120 + 120*84 + 84*10
    # multiply-adds (2 FLOPs each); backward = 2x forward, less conv1's input gradient (the images need none).
    forward = 2 * (24 * 24 * 25 * 6 + 8 * 8 * 25 * 6 * 16 + 256 * 120 + 120 * 84 + 84 * 10)
    conv1 = 2 * 24 * 24 * 25 * 6
    expected = 3 * forward - conv1
    counted = flops.training_flops_per_image(
        "lenet", width=32, image_shape=[1, 28, 28], num_classes=10, precision="fp32"
    )
    assert counted == pytest.approx(expected)


def test_flops_grow_with_the_fast_networks_width():
    def count(width: int) -> float:
        return flops.training_flops_per_image(
            "fast", width=width, image_shape=[1, 28, 28], num_classes=10, precision="fp32"
        )

    # Every conv after the stem has width x width channel pairs: doubling the width nearly quadruples the FLOPs.
    assert 3.5 < count(32) / count(16) < 4.0


def test_nominal_peak_is_cores_times_clock_times_flops_per_cycle():
    peak = flops.nominal_peak()
    if not peak["mhz"]:
        pytest.skip("/proc/cpuinfo shows no clock here")
    assert peak["fp32"] == pytest.approx(peak["cores"] * peak["mhz"] * 1e6 * peak["flops_per_cycle_per_core"]["fp32"])
    if peak["bf16"] is not None:
        assert peak["bf16"] > peak["fp32"]


def _row(recipe: str, dataset: str, accuracy: float, seconds: float, rss: float = 1000.0) -> dict:
    return {
        "recipe": recipe,
        "dataset": dataset,
        "test_accuracy": accuracy,
        "wall_seconds": seconds,
        "peak_rss_mib": rss,
    }


def _verdicts(rows: list[dict]) -> dict[str, dict]:
    baselines = {r["dataset"]: r for r in rows if r["recipe"].startswith("tutorial")}
    for row in rows:
        row["time_ratio_to_tutorial"] = row["wall_seconds"] / baselines[row["dataset"]]["wall_seconds"]
    return {v["target"]: v for v in run.target_verdicts(rows, baselines)}


def test_a_target_is_met_by_the_fastest_row_that_meets_it():
    verdicts = _verdicts(
        [
            _row("tutorial", "fashion-mnist", 0.85, 100.0),
            _row("slow-and-good", "fashion-mnist", 0.945, 99.0),
            _row("fast-and-good", "fashion-mnist", 0.941, 80.0),
            _row("fast-and-weak", "fashion-mnist", 0.930, 50.0),
        ]
    )
    assert verdicts["4"]["status"] == "met"
    assert verdicts["4"]["recipe"] == "fast-and-good"
    assert verdicts["1"]["status"] == "not run"  # no CIFAR-10 rows: not a miss, not a pass


def test_a_missed_target_names_the_closest_row_and_the_shortfall():
    verdicts = _verdicts(
        [
            _row("tutorial", "cifar10-jpeg", 0.55, 100.0),
            _row("good-but-slow", "cifar10-jpeg", 0.88, 120.0),  # 0.20x over
            _row("fast-but-weak", "cifar10-jpeg", 0.86, 90.0),  # 1 point short
            _row("hopeless", "cifar10-jpeg", 0.50, 10.0),
        ]
    )
    target = verdicts["1"]
    assert target["status"] == "missed"
    assert target["recipe"] == "good-but-slow"
    assert "0.20x over" in target["line"] and "short" not in target["line"]
    assert verdicts["2"]["status"] == "missed"  # 90.5% is reached by no row, however slow


def test_the_memory_target_looks_at_the_largest_row():
    rows = [
        _row("tutorial", "fashion-mnist", 0.85, 100.0, rss=800.0),
        _row("big", "fashion-mnist", 0.9, 50.0, rss=4200.0),
    ]
    verdict = _verdicts(rows)["5"]
    assert verdict["status"] == "missed" and verdict["recipe"] == "big"


def test_every_benchmark_recipe_is_valid_params():
    """A misspelt key in bench/recipes.yaml would otherwise surface only deep into `make bench`."""
    import yaml

    from imgcls.params.core import read_yaml
    from imgcls.params.project import parse_params

    recipes = yaml.safe_load((REPO_ROOT / "bench" / "recipes.yaml").read_text())
    assert recipes
    for name, overrides in recipes.items():
        for section in overrides:
            assert section in ("preprocess", "train", "evaluate"), f"{name}: section {section}"
        parse_params(merge(read_yaml(REPO_ROOT / "params.yaml"), overrides))  # raises naming the key
        folder, data = run.recipe_data(name, overrides)
        assert folder.startswith(run.recipe_dataset(name))
        if "preprocess" in overrides:
            assert (
                folder != run.recipe_dataset(name)
                and data["preprocess"]["val_fraction"] == overrides["preprocess"]["val_fraction"]
            )
        elif not name.startswith("cifar10"):
            # the committed split prepares the data: a project prepared under another params.yaml is redone
            assert (
                data["preprocess"]["val_fraction"] == read_yaml(REPO_ROOT / "params.yaml")["preprocess"]["val_fraction"]
            )


def test_every_search_run_is_valid_params_on_a_candidate_layout():
    """bench/search.yaml (issue 25's search) names candidate layouts registered by bench/candidates.py only in
    the benchmark's processes; each run must parse with them registered, and each layout must build and keep
    its smallest image size."""
    import candidates
    import torch
    import yaml

    from imgcls.model.registry import MODELS
    from imgcls.params.core import read_yaml
    from imgcls.params.project import parse_params

    runs = yaml.safe_load((REPO_ROOT / "bench" / "search.yaml").read_text())
    saved = dict(MODELS)
    try:
        candidates.register()
        for name, overrides in runs.items():
            assert set(overrides) <= {"preprocess", "train", "evaluate"}, name
            assert overrides["train"]["model"].startswith("cand_"), name
            parse_params(merge(read_yaml(REPO_ROOT / "params.yaml"), overrides))  # raises naming the key
        for name, layout in candidates.LAYOUTS.items():
            side = layout.min_image_size()
            model = MODELS[f"cand_{name}"].build(
                8, 0.0, in_channels=1, num_classes=3, image_size=side, mean=[0.5], std=[0.25]
            )
            model.initialize_from_data(torch.randint(0, 256, (4, 1, side, side), dtype=torch.uint8))
            assert model(torch.rand(2, 1, side, side)).shape == (2, 3), name
    finally:
        MODELS.clear()
        MODELS.update(saved)
