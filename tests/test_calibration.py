"""Calibrated confidence: temperature scaling fitted on the validation split, ECE and the reliability table,
and temperatures read from files treated as untrusted data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imgcls.calibration import (
    MAX_TEMPERATURE,
    checked_temperature,
    checkpoint_temperature,
    expected_calibration_error,
    fit_temperature,
    probabilities,
    reliability,
)
from imgcls.errors import UserError


def overconfident(n: int = 4000, classes: int = 5, seed: int = 0, scale: float = 4.0):
    """Logits of a classifier right ~70% of the time whose logits are ``scale`` x too sharp: the true
    temperature is ``scale``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    calibrated = rng.normal(0, 1, (n, classes))
    calibrated[np.arange(n), labels] += 1.6
    # Draw the labels from the calibrated model itself, so softmax(calibrated) is exactly calibrated.
    p = probabilities(calibrated)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return torch.tensor(calibrated * scale, dtype=torch.float32), torch.tensor(labels)


def test_fitted_temperature_recovers_the_true_one_and_cuts_the_calibration_error():
    logits, labels = overconfident(scale=4.0)
    fitted = fit_temperature(logits, labels)
    assert 3.5 < fitted.temperature < 4.6, fitted
    assert fitted.nll_after < fitted.nll_before
    before = expected_calibration_error(probabilities(logits.numpy()), labels.numpy())
    after = expected_calibration_error(probabilities(logits.numpy(), fitted.temperature), labels.numpy())
    assert before > 0.1 and after < 0.03 and after < before / 4, (before, after)


def test_timid_logits_get_a_temperature_below_one():
    logits, labels = overconfident(scale=0.4, seed=1)
    assert fit_temperature(logits, labels).temperature < 0.5


def test_temperature_changes_no_predicted_class():
    logits, labels = overconfident(seed=2)
    fitted = fit_temperature(logits, labels)
    assert (
        probabilities(logits.numpy(), fitted.temperature).argmax(1) == probabilities(logits.numpy()).argmax(1)
    ).all()


def test_a_degenerate_split_never_makes_the_likelihood_worse():
    # One image, labelled against a confident prediction: the fit may run to the bound; never worse than 1.
    fitted = fit_temperature(torch.tensor([[5.0, -5.0]]), torch.tensor([1]))
    assert fitted.nll_after <= fitted.nll_before + 1e-9
    assert 0.01 <= fitted.temperature <= MAX_TEMPERATURE
    with pytest.raises(ValueError, match="no images"):
        fit_temperature(torch.zeros((0, 3)), torch.zeros(0, dtype=torch.long))


def test_ece_is_zero_when_confidence_matches_accuracy_and_large_when_it_does_not():
    # 10 images at confidence 0.8 of which 8 are right: calibrated.
    probs = np.tile([[0.8, 0.2]], (10, 1))
    labels = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # The same confidence, all wrong: off by 0.8.
    assert expected_calibration_error(probs, np.ones(10, dtype=int)) == pytest.approx(0.8)
    table = reliability(probs, labels)
    assert sum(b.images for b in table) == 10
    (full,) = [b for b in table if b.images]
    assert full.low < 0.8 <= full.high and full.accuracy == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, 1e9, 1e-30, True, "2.0", [1.5]])
def test_a_temperature_from_a_file_must_be_a_sane_number(bad):
    with pytest.raises(UserError, match="not a temperature"):
        checked_temperature(bad, "model.onnx: metadata field temperature", "re-export it")


def test_files_from_before_calibration_mean_no_scaling():
    assert checked_temperature(None, "x", "y") == 1.0
    assert checkpoint_temperature({"extra": {}}, "checkpoint.pt") == 1.0
    assert checkpoint_temperature({"extra": {"calibration": None}}, "checkpoint.pt") == 1.0
    assert checkpoint_temperature({"extra": {"calibration": {"temperature": 1.7}}}, "checkpoint.pt") == 1.7
    with pytest.raises(UserError, match="extra.calibration.temperature"):
        checkpoint_temperature({"extra": {"calibration": {"temperature": float("nan")}}}, "checkpoint.pt")


def test_onnx_metadata_with_a_hostile_temperature_is_refused(tmp_path):
    """A model file's temperature is data: NaN or 1e300 would make every probability meaningless."""
    from imgcls.predict.models import check_facts

    facts = {"class_names": ["a", "b"], "image_size": 16, "channels": 3}
    assert check_facts(tmp_path / "m.onnx", dict(facts))["temperature"] == 1.0  # exports from before
    assert check_facts(tmp_path / "m.onnx", {**facts, "temperature": 2.5})["temperature"] == 2.5
    for bad in (1e300, -2, "hot", 0):
        text = json.dumps({**facts, "temperature": bad})
        with pytest.raises(UserError, match="metadata field temperature"):
            check_facts(tmp_path / "m.onnx", json.loads(text))
