"""Training images whose given label is probably wrong: confident learning on out-of-sample probabilities.

Two steps. ``out_of_sample_probabilities`` trains one model per fold of a stratified k-fold split with the
project's own ``fit`` and recipe, and scores each image with the model that never trained on it (a model
scoring its own training images has learnt their labels, wrong ones included). ``confident_learning`` then
finds the images whose given label disagrees with what those probabilities confidently say, after
Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels" (JAIR 70, 2021),
as cleanlab's ``find_label_issues`` does with its defaults (``filter_by="prune_by_noise_rate"``), ranked by
cleanlab's normalized margin.

The method is implemented here, not imported: cleanlab would bring scikit-learn and SciPy into the
environment for about 80 lines of NumPy. Where this code departs from cleanlab 2.x it says so.
``write_suspects_csv`` and ``plot_suspects`` write what a person reviews.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..fileio import atomic_path
from ..model.inference import predict
from ..model.registry import build_model
from ..params.train import TrainParams
from ..runtime import seed_everything
from ..train.loop import VALIDATION_BATCH_SIZE, FitSetup, fit
from ..train.transfer import StartingWeights, apply_starting_weights

# Probability rows may sum to 1 only within float32 rounding (softmax) or a few printed digits; logits or
# unnormalized scores miss it by far more.
ROW_SUM_TOLERANCE = 1e-3
# Softmax outputs may stray this far outside [0, 1] by float rounding.
VALUE_TOLERANCE = 1e-6
# cleanlab subtracts a small epsilon from each threshold so a probability equal to its class's mean (every
# image of a class scored alike) counts as confident despite float rounding in the mean.
THRESHOLD_SLACK = 1e-6


@dataclass(frozen=True)
class LabelSuspects:
    """Training rows whose given label confident learning doubts, most suspicious first. All arrays (S,)."""

    indices: np.ndarray  # int64: rows of the training split
    given: np.ndarray  # int64: their given labels
    suggested: np.ndarray  # int64: the class the out-of-sample model puts first (never the given one)
    given_probability: np.ndarray  # float: out-of-sample probability of the given label (self-confidence)
    suggested_probability: np.ndarray  # float: out-of-sample probability of the suggested class
    score: np.ndarray  # float: normalized margin, (p_given - max other p + 1) / 2 in [0, 1]; low: suspicious
    estimated_issues: int  # label errors the calibrated confident joint estimates (its off-diagonal sum)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------- confident learning


def check_probabilities(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` (N,) as int64 and ``probabilities`` (N, K) as float64, or a ValueError saying what is wrong."""
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D array (images, classes); got shape {probabilities.shape}")
    n, k = probabilities.shape
    if k < 2:
        raise ValueError(f"probabilities have {k} class column(s): label errors need at least 2 classes")
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(f"labels must be one label per row of probabilities ({n}); got labels of shape {labels.shape}")
    if n and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be class indices (integers); got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= k):
        bad = int(np.flatnonzero((labels < 0) | (labels >= k))[0])
        raise ValueError(f"label {labels[bad]} of row {bad} is not a class index of the {k} probability columns")
    if not np.issubdtype(probabilities.dtype, np.number):
        raise ValueError(f"probabilities must be numbers; got dtype {probabilities.dtype}")
    probabilities = probabilities.astype(np.float64)
    finite = np.isfinite(probabilities)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(1))[0])
        raise ValueError(
            f"probabilities hold {int((~finite).sum())} NaN or infinite value(s), the first in row {row}: the "
            "model that scored it produced no usable output (a diverged fold?); train it again"
        )
    if n and (probabilities.min() < -VALUE_TOLERANCE or probabilities.max() > 1 + VALUE_TOLERANCE):
        raise ValueError(
            f"probabilities must lie in [0, 1]; found {probabilities.min():.4g}..{probabilities.max():.4g}: "
            "pass softmax outputs, not logits"
        )
    sums = probabilities.sum(1)
    off = np.abs(sums - 1) > ROW_SUM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"each row of probabilities must sum to 1; {int(off.sum())} do not, e.g. row {row} sums to "
            f"{sums[row]:.4g}: pass softmax outputs over all classes"
        )
    return labels.astype(np.int64), probabilities


def per_class_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """t_j: the mean probability of class j over the images labelled j (the model's self-confidence on the
    class); infinite for a class without images, so no image is ever confidently of it. Shape (K,)."""
    k = probabilities.shape[1]
    counts = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=probabilities[np.arange(len(labels)), labels], minlength=k)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def confident_joint(labels: np.ndarray, probabilities: np.ndarray, *, calibrate: bool = True) -> np.ndarray:
    """The confident joint C (K, K) int64: C[i][j] counts images labelled i whose probability of j reaches
    t_j; an image above several thresholds counts for the likeliest of those, an image above none counts
    nowhere. Each diagonal entry is at least 1 (cleanlab: every class has a correctly labelled example).

    ``calibrate`` (the paper's eq. 2): each row rescaled to the number of images labelled i, then rounded
    to integers that keep that total, so the off-diagonal sum estimates the number of label errors.

    cleanlab 2.x takes the argmax over all classes when several are above threshold; the paper (and this)
    takes it over the classes above threshold only."""
    labels, probabilities = check_probabilities(labels, probabilities)
    k = probabilities.shape[1]
    above = probabilities >= per_class_thresholds(labels, probabilities) - THRESHOLD_SLACK  # (N, K)
    confident = above.any(1)
    true_guess = np.where(above, probabilities, -1.0).argmax(1)  # likeliest class above its threshold
    joint = np.zeros((k, k), dtype=np.int64)
    np.add.at(joint, (labels[confident], true_guess[confident]), 1)
    np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    if not calibrate:
        return joint
    counts = np.bincount(labels, minlength=k)
    # Rows rescaled to the label counts already sum to N, so the paper's second normalization (to sum N) is
    # the identity here: left out. A class without images has a zero row.
    scaled = joint / joint.sum(1, keepdims=True) * counts[:, None]
    return round_keeping_row_sums(scaled, counts)


def round_keeping_row_sums(matrix: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round each row of non-negative ``matrix`` to integers summing to ``totals`` (largest remainders)."""
    rounded = np.floor(matrix).astype(np.int64)
    for row in range(len(matrix)):
        missing = int(totals[row] - rounded[row].sum())
        if missing > 0:
            remainders = matrix[row] - rounded[row]
            rounded[row, np.argsort(-remainders, kind="stable")[:missing]] += 1
    return rounded


def normalized_margin(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """cleanlab's normalized margin per image, (p_given - largest other p + 1) / 2 in [0, 1]: 0 when the
    model is sure of another class, 0.5 at a tie, 1 when sure of the given one. Shape (N,)."""
    rows = np.arange(len(labels))
    given = probabilities[rows, labels]
    others = probabilities.copy()
    others[rows, labels] = -np.inf
    return (given - others.max(1, initial=-np.inf) + 1) / 2


def prune_by_noise_rate(labels: np.ndarray, probabilities: np.ndarray, joint: np.ndarray) -> np.ndarray:
    """The paper's "prune by noise rate" (cleanlab's default filter): for each off-diagonal cell C[i][j] of
    the calibrated ``joint``, the C[i][j] images labelled i with the largest margin p_j - p_i are flagged
    (an image may top two cells: it is flagged once). Each class keeps at least one image and a class of one
    image loses none, as with cleanlab's min_examples_per_class=1. Returns a mask (N,).

    Two small departures from cleanlab 2.x: exactly C[i][j] images per cell (cleanlab flags every image at
    the cut-off margin, so ties can add more), and a row that would empty its class is cut one image at a
    time from its largest cell (cleanlab lowers all its non-zero cells evenly). Both matter only at exact
    ties and in classes of a few images."""
    k = joint.shape[0]
    flagged = np.zeros(len(labels), dtype=bool)
    for given in range(k):
        rows = np.flatnonzero(labels == given)
        if len(rows) <= 1:
            continue
        to_prune = joint[given].copy()
        to_prune[given] = 0
        while to_prune.sum() > len(rows) - 1:  # keep one image of the class
            to_prune[to_prune.argmax()] -= 1
        for true in np.flatnonzero(to_prune):
            margin = probabilities[rows, true] - probabilities[rows, given]
            flagged[rows[np.argsort(-margin, kind="stable")[: to_prune[true]]]] = True
    return flagged


def confident_learning(labels: np.ndarray, probabilities: np.ndarray) -> LabelSuspects:
    """Training images whose given label is probably wrong, from out-of-sample ``probabilities`` (N, K)
    (rows: softmax outputs of a model that never trained on that image) and the given ``labels`` (N,).

    Confident learning (Northcutt et al. 2021): per-class thresholds, the calibrated confident joint, then
    "prune by noise rate" (``prune_by_noise_rate``), less any image whose likeliest class is its given one,
    ranked by normalized margin, lowest first (cleanlab's ``find_label_issues(...,
    filter_by="prune_by_noise_rate", return_indices_ranked_by="normalized_margin")``). A class without images
    is allowed (no image is ever suspected of belonging to it). Bad input raises ValueError."""
    labels, probabilities = check_probabilities(labels, probabilities)
    joint = confident_joint(labels, probabilities)
    suggested = probabilities.argmax(1)
    flagged = prune_by_noise_rate(labels, probabilities, joint) & (suggested != labels)
    score = normalized_margin(labels, probabilities)
    rows = np.flatnonzero(flagged)
    rows = rows[np.argsort(score[rows], kind="stable")]  # ties: the lower row first
    return LabelSuspects(
        indices=rows.astype(np.int64),
        given=labels[rows],
        suggested=suggested[rows].astype(np.int64),
        given_probability=probabilities[rows, labels[rows]],
        suggested_probability=probabilities[rows, suggested[rows]],
        score=score[rows],
        estimated_issues=int(joint.sum() - np.trace(joint)),
    )


# --------------------------------------------------------------------------------- out-of-sample scoring


def stratified_folds(labels: np.ndarray, folds: int, seed: int, class_names: Sequence[str] | None = None) -> np.ndarray:
    """The fold (0..folds-1) of each image (N,): each class shuffled with ``seed`` and dealt round-robin, so
    every fold holds each class's share and fold sizes differ by at most one.

    Every class with images needs at least ``folds`` of them (a DataError otherwise): with fewer, some
    folds would hold none of the class out, and a class of one image would be scored by a model that never
    saw the class at all, which makes its label look wrong whatever it is. Fewer folds are not chosen
    silently: the error names the class and the largest number of folds the data allows."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (each image scored by a model trained without it); got {folds}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True) if n < folds]
    if short:

        def name(c: int) -> str:
            return repr(class_names[c]) if class_names is not None else f"class {c}"

        listed = ", ".join(f"{name(c)} ({n} image{'s' * (n != 1)})" for c, n in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        smallest = int(counts.min())
        raise DataError(
            f"{len(short)} class(es) of the training split have fewer images than the {folds} folds: {listed}{more}",
            advice=(
                f"use at most {smallest} folds" if smallest >= 2 else "no number of folds scores a class of one image"
            )
            + ", or give those classes more images",
        )
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=np.int64)
    dealt = 0  # carried across classes, so the folds fill evenly
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        fold_of[rows] = (dealt + np.arange(len(rows))) % folds
        dealt += len(rows)
    return fold_of


def checked_fold_inputs(
    images_uint8: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    *,
    config: TrainParams,
    num_classes: int,
    epochs: int,
    start: StartingWeights | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """The images as a uint8 tensor (N, C, H, W) and the labels as an array, or a ValueError before any
    training saying what does not fit."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1; got {epochs}")
    if start is None and (config.pretrained != "none" or config.init_from != "none"):
        raise ValueError(
            "config names starting weights (train.pretrained or train.init_from) but no `start` was passed: "
            "load them as the train stage does (train.stage.starting_weights) and pass them"
        )
    images, labels = torch.as_tensor(images_uint8), np.asarray(labels)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), as prepared; got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (arguments['num_classes'] = {num_classes})")
    return images, labels


def score_held_out(
    data: tuple[torch.Tensor, torch.Tensor],
    training: torch.Tensor,
    held_out: torch.Tensor,
    *,
    arguments: dict,
    setup: FitSetup,
    seed: int,
    start: StartingWeights | None,
) -> np.ndarray:
    """One fold: a fresh model trained by ``fit`` on the ``training`` rows of ``data`` (uint8 images, labels,
    on the device), then its softmax (held-out rows, classes) on the ``held_out`` rows."""
    images, targets = data
    generator = seed_everything(seed)  # before building: the weights' initialization draws too
    model = build_model(setup.config.model, **arguments)
    if start is not None:
        apply_starting_weights(model, start, "the folds' starting weights")
    model = model.to(setup.device, memory_format=torch.channels_last)
    fit(model, (images[training], targets[training]), None, setup, generator)
    logits = predict(
        model, images[held_out], batch_size=VALIDATION_BATCH_SIZE, device=setup.device, precision=setup.precision
    )
    return torch.softmax(logits.float(), 1).cpu().numpy()


def out_of_sample_probabilities(
    images_uint8: torch.Tensor | np.ndarray,
    labels: np.ndarray,
    *,
    config: TrainParams,
    arguments: dict,
    folds: int,
    epochs: int,
    device: torch.device,
    precision: str,
    seed: int,
    on_fold: Callable[[int, int, float], None] | None = None,
    start: StartingWeights | None = None,
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Softmax probabilities (N, classes) float32 for uint8 ``images_uint8`` (N, C, H, W), each row from a
    model that did not train on that image: stratified ``folds`` (``stratified_folds``), and per fold a fresh
    ``build_model(config.model, **arguments)`` trained by the project's ``fit`` on the other folds with the
    recipe in ``config`` (resolved, as the train stage resolves it) for ``epochs`` epochs, then predicting
    the held-out fold. ``arguments`` are build_model's (in_channels, num_classes, image_size, mean, std,
    width, whiten_bias_epochs); a class without images gets its column all the same.

    Each fold trains as the train stage would on (folds-1)/folds of the images: fit takes the batch size and
    any extra epochs from ``run_length``, so train.min_batches_per_epoch cuts the batch and train.min_steps
    raises the epochs on small data exactly as in a real run (lower min_steps in ``config`` for faster,
    weaker folds). Folds cost about ``folds - 1`` normal runs of ``epochs`` where the data decide the length,
    and up to ``folds`` runs where min_steps does.

    ``seed``: the folds, and each fold's weights and batch order (fold f seeds everything with seed + f);
    the same seed gives the same probabilities. ``on_fold(fold, folds, seconds)`` hears each finished fold
    (1-based). ``start``: the starting weights the train stage would load (train.pretrained); each fold
    fine-tunes from them. Only weights that never saw these images keep the scores out of sample: an
    init_from checkpoint trained on this split does not. ``class_names`` name classes in errors."""
    num_classes = int(arguments["num_classes"])
    images, labels = checked_fold_inputs(
        images_uint8, labels, config=config, num_classes=num_classes, epochs=epochs, start=start
    )
    fold_of = stratified_folds(labels, folds, seed, class_names)
    # Resident on the device for the whole run; each fold's training part is a copy of it.
    data = (images.to(device), torch.as_tensor(labels, dtype=torch.int64).to(device))
    config = config.model_copy(update={"epochs": epochs})
    setup = FitSetup(config, device, precision, fine_tune=start is not None, num_classes=num_classes)
    probabilities = np.zeros((len(labels), num_classes), dtype=np.float32)
    for fold in range(folds):
        started = time.perf_counter()
        held_out = np.flatnonzero(fold_of == fold)
        training = np.flatnonzero(fold_of != fold)
        probabilities[held_out] = score_held_out(
            data,
            torch.from_numpy(training).to(device),
            torch.from_numpy(held_out).to(device),
            arguments=arguments,
            setup=setup,
            seed=seed + fold,
            start=start,
        )
        if on_fold is not None:
            on_fold(fold + 1, folds, time.perf_counter() - started)
    return probabilities


# ----------------------------------------------------------------------------------------------- outputs

CSV_COLUMNS = ("rank", "file", "given", "suggested", "given_probability", "suggested_probability", "score")


def _check_rows(suspects: LabelSuspects, rows: int, what: str) -> None:
    if len(suspects) and int(suspects.indices.max()) >= rows:
        raise ValueError(
            f"the suspects refer to training row {int(suspects.indices.max())} but {what} has only {rows} entries: "
            "pass the training split the probabilities were computed on"
        )


def write_suspects_csv(path: Path, suspects: LabelSuspects, names: Sequence[str], class_names: Sequence[str]) -> None:
    """One row per suspect, most suspicious first: rank (1-based), file (``names[row]``, the training image's
    file or source name), given and suggested class names, both probabilities and the score. Atomic."""
    _check_rows(suspects, len(names), "names")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for row in range(len(suspects)):
            writer.writerow(
                [
                    row + 1,
                    names[int(suspects.indices[row])],
                    class_names[int(suspects.given[row])],
                    class_names[int(suspects.suggested[row])],
                    f"{suspects.given_probability[row]:.6f}",
                    f"{suspects.suggested_probability[row]:.6f}",
                    f"{suspects.score[row]:.6f}",
                ]
            )


def _short(name: str, limit: int = 36) -> str:
    """The end of a long path (its file name and nearest folders), which tells images apart."""
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


def plot_suspects(
    path: Path,
    images_uint8: torch.Tensor | np.ndarray,
    suspects: LabelSuspects,
    class_names: Sequence[str],
    *,
    limit: int = 20,
    names: Sequence[str] | None = None,
) -> int:
    """A PNG grid of the first ``limit`` suspects: each image (uint8 (N, C, H, W), 1 or 3 channels, the
    training split the suspects index) titled "given X -> model Y (p)", with its file name in small print
    under it when ``names`` are given. With no suspects the image says so. Atomic; returns how many it drew."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend switch

    _check_rows(suspects, len(images_uint8), "images_uint8")
    if names is not None:
        _check_rows(suspects, len(names), "names")
    shown = min(max(limit, 0), len(suspects))
    columns = max(1, min(5, shown))
    rows = max(1, -(-shown // columns))
    figure = Figure(figsize=(max(2.3 * columns, 5.0), 2.7 * rows + 0.4))  # wide enough for the title
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        # No ticks or frame, but the axes stay on: the file name is an x label, which tight_layout makes room for.
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for position in range(shown):
        row = int(suspects.indices[position])
        image = images_uint8[row]
        image = (image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)).transpose(1, 2, 0)
        if image.shape[2] not in (1, 3):
            raise ValueError(f"plot_suspects draws 1- or 3-channel images; got {image.shape[2]} channels")
        ax = axes.flat[position]
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(image)
        given, suggested = class_names[int(suspects.given[position])], class_names[int(suspects.suggested[position])]
        ax.set_title(
            f"given {given}\n-> model {suggested} ({suspects.suggested_probability[position]:.2f})", fontsize=8
        )
        if names is not None:
            ax.set_xlabel(_short(str(names[row])), fontsize=6)
    if not shown:
        axes.flat[0].text(0.5, 0.5, "no suspected label errors", ha="center", va="center", fontsize=10)
    more = f" (first {shown} of {len(suspects)})" if shown < len(suspects) else ""
    figure.suptitle(f"suspected label errors, most suspicious first{more}", fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return shown
