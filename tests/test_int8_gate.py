"""The int8 gate judges the drop against the test split's size: a flip or two on a small split is noise."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.deploy.stage import check_int8_drop
from imgcls.errors import ExportError
from imgcls.stats import PairedDrop, paired_drop


def test_paired_drop_counts_only_the_images_the_models_disagree_on():
    labels = np.array([0, 1, 2, 3, 4, 5])
    fp32 = np.array([0, 1, 2, 3, 9, 9])  # 4 right
    int8 = np.array([0, 1, 9, 3, 4, 9])  # 4 right: one now wrong (2), one now right (4)
    drop = paired_drop(fp32, int8, labels)
    assert (drop.images, drop.worse, drop.better) == (6, 1, 1)
    assert drop.drop_points == 0.0


def test_one_flipped_image_of_153_passes_although_it_is_over_half_a_point():
    drop = PairedDrop(images=153, worse=1, better=0)
    assert drop.drop_points == pytest.approx(0.654, abs=1e-3)  # over the 0.5-point default
    assert drop.noise_points > drop.drop_points
    check_int8_drop(drop, 0.63, 0.6235, max_drop=0.5)


def test_a_real_drop_on_ten_thousand_images_is_refused_with_its_figures():
    # The full-range int8 model on a CPU without VNNI: 0.9385 -> 0.9198 (measured; see deploy/quantize.py).
    drop = PairedDrop(images=10_000, worse=230, better=43)
    assert drop.drop_points == pytest.approx(1.87)
    assert drop.noise_points == pytest.approx(0.32, abs=0.01)
    with pytest.raises(ExportError) as caught:
        check_int8_drop(drop, 0.9385, 0.9198, max_drop=0.5)
    message = str(caught.value)
    assert "1.87 points lower" in message and "230 images now wrong, 43 now right" in message
    assert "+-0.32 points is noise" in message and "-S export.int8_max_drop=2" in message
    assert "the previous exports are kept" in message and "export.int8_calibration_images" in message


def test_the_refusal_offers_more_calibration_only_when_training_images_are_left():
    drop = PairedDrop(images=153, worse=24, better=11)  # measured on a 244-photo cat/dog set, 64 pixels
    with pytest.raises(ExportError) as caught:
        check_int8_drop(drop, 0.6275, 0.5425, max_drop=0.5, more_calibration=False)
    assert "int8_calibration_images" not in str(caught.value) and "-S export.int8_max_drop=9" in str(caught.value)


def test_a_drop_within_max_drop_passes_even_when_it_is_beyond_noise():
    drop = PairedDrop(images=100_000, worse=400, better=100)  # 0.30 points, noise 0.04
    assert drop.drop_points > drop.noise_points
    check_int8_drop(drop, 0.9, 0.897, max_drop=0.5)
    with pytest.raises(ExportError):
        check_int8_drop(drop, 0.9, 0.897, max_drop=0.2)
