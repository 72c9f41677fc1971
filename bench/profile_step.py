"""Where a training step's time goes: data (batching + augmentation), forward, backward, optimizer,
and evaluation, for one recipe of bench/recipes.yaml on its data set's image shape; and how far the step is
from what this CPU can do: the step's floating-point operations (forward + backward, counted by torch's
FlopCounterMode), the FLOP/s it achieves, and that as a share of the FLOP/s of a large matrix product in the
same precision on the same threads (the attainable peak, measured) and of the nominal cores x clock x
FLOPs/cycle (bench/flops.py).

    .venv/bin/python bench/profile_step.py [RECIPE] [--steps N]

Uses the recipe's prepared images from a previous `make bench` when present (else random uint8 images
of the same shape: the timings do not depend on pixel values). Prints a table; writes
bench/results/profile-RECIPE.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import yaml
from common import REPO_ROOT, machine, merge_params, write_results
from flops import PEAK_SIZE, cpu_features, matmul_peak, nominal_peak, step_flops
from run import WORK, recipe_data, recipe_dataset

from imgcls.model.inference import predict
from imgcls.model.networks import TTAModel
from imgcls.model.registry import build_model
from imgcls.params.core import read_yaml
from imgcls.params.project import parse_params
from imgcls.params.train import params_with_recipe
from imgcls.runtime import resolve_precision, seed_everything
from imgcls.train.loop import apply_update, backward, epoch_batches, forward_loss, make_training_setup, set_rate

SHAPES = {"cifar10-jpeg": (50000, 10000, 3, 32), "fashion-mnist": (60000, 10000, 1, 28)}  # train, test, C, side


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe", nargs="?", default="cifar10-fast")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compile", action="store_true", help="time the step through torch.compile")
    args = parser.parse_args()
    recipe = yaml.safe_load((REPO_ROOT / "bench" / "recipes.yaml").read_text())[args.recipe]
    # the recipe's overrides, validated like a stage validates them
    params = params_with_recipe(parse_params(merge_params(read_yaml(REPO_ROOT / "params.yaml"), recipe)))
    config, evaluate_config = params.train, params.evaluate

    generator = seed_everything(0)
    dataset = recipe_dataset(args.recipe)
    prepared = WORK / recipe_data(args.recipe, recipe)[0] / "data" / "prepared"  # where bench/run.py prepared it
    n_train, n_test, channels, side = SHAPES[dataset]
    if (prepared / "train_images.npy").is_file():
        images = torch.from_numpy(np.load(prepared / "train_images.npy"))
        test_images = torch.from_numpy(np.load(prepared / "test_images.npy"))
        data = f"prepared {dataset} images"
    else:
        images = torch.randint(0, 256, (n_train, channels, side, side), dtype=torch.uint8)
        test_images = torch.randint(0, 256, (n_test, channels, side, side), dtype=torch.uint8)
        data = f"random uint8 images, {dataset} shape"
    labels = torch.randint(0, 10, (len(images),))
    device = torch.device("cpu")
    precision = resolve_precision(config.precision, device)
    model = build_model(
        config.model,
        in_channels=channels,
        num_classes=10,
        image_size=side,
        mean=[0.5] * channels,
        std=[0.25] * channels,
        width=config.width,
        whiten_bias_epochs=config.whiten_bias_epochs,
    )
    model = model.to(memory_format=torch.channels_last)
    # The same set-up and step phases as imgcls.train.loop.fit / train_one_epoch, timed one by one.
    model.initialize_from_data(images)
    setup = make_training_setup(model, images, config=config, generator=generator)
    batches = epoch_batches(setup, images, labels, 1, generator)
    factor = 0.01  # tiny steps: the profile measures time, not learning
    totals = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
    model.train()
    step_model = torch.compile(model) if args.compile else model
    warmup_steps = 6 if args.compile else 3  # compilation happens in the first calls
    for step in range(args.steps + warmup_steps):
        marks = [time.perf_counter()]
        batch, batch_labels = next(batches)
        marks.append(time.perf_counter())
        set_rate(setup.optimizer, factor)
        _, loss = forward_loss(step_model, batch, batch_labels, setup.loss_fn, device, precision)
        marks.append(time.perf_counter())
        backward(setup.optimizer, loss)
        marks.append(time.perf_counter())
        apply_update(setup.optimizer, setup.lookahead, model, step, factor)
        marks.append(time.perf_counter())
        if step >= warmup_steps:  # the first steps warm up allocators, kernels (and compilation)
            for key, begin, finish in zip(totals, marks, marks[1:], strict=False):
                totals[key] += finish - begin
    step_seconds = sum(totals.values()) / args.steps
    steps_per_epoch = setup.steps_per_epoch
    flops = step_flops(model, batch, batch_labels, setup.loss_fn, device, precision)
    achieved = flops / step_seconds
    peaks = {p: matmul_peak(p) for p in dict.fromkeys((precision, "fp32"))}
    eval_model = TTAModel(model) if evaluate_config.tta else model
    started = time.perf_counter()
    predict(eval_model, test_images, batch_size=evaluate_config.batch_size, device=device, precision=precision)
    evaluation_seconds = time.perf_counter() - started

    print(
        f"recipe {args.recipe}: {config.model} width {config.width}, batch {config.batch_size}, {precision}, "
        f"{'torch.compile, ' if args.compile else ''}"
        f"{args.steps} steps timed; data: {data}"
    )
    print(f"{'phase':<12}{'ms/step':>9}{'share':>8}{'s/epoch':>9}")
    for key, seconds in totals.items():
        per_step = seconds / args.steps
        print(f"{key:<12}{per_step * 1000:>9.1f}{per_step / step_seconds:>8.1%}{per_step * steps_per_epoch:>9.1f}")
    print(
        f"{'step':<12}{step_seconds * 1000:>9.1f}{1:>8.0%}{step_seconds * steps_per_epoch:>9.1f}"
        f"   ({config.batch_size / step_seconds:,.0f} training images/s)"
    )
    print(f"evaluation of {len(test_images)} test images (tta={evaluate_config.tta}): {evaluation_seconds:.1f} s")
    print(
        f"step: {flops / 1e9:.1f} GFLOP ({flops / len(batch) / 1e6:.1f} MFLOP per image, forward + backward), "
        f"achieved {achieved / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads; CPU features: "
        f"{', '.join(cpu_features())}"
    )
    for name, peak in peaks.items():
        print(
            f"  {PEAK_SIZE}x{PEAK_SIZE} matrix product in {name}: {peak / 1e9:.1f} GFLOP/s; "
            f"the step reaches {achieved / peak:.1%} of it"
        )
    nominal = nominal_peak()
    for name in dict.fromkeys((precision, "fp32")):
        if nominal[name]:
            print(
                f"  nominal {name} peak: {nominal['cores']} cores x {nominal['mhz']:.0f} MHz x "
                f"{nominal['flops_per_cycle_per_core'][name]} FLOP/cycle = {nominal[name] / 1e9:.1f} GFLOP/s; "
                f"the step reaches {achieved / nominal[name]:.1%} of it"
            )
    payload = {
        "machine": machine(),
        "recipe": args.recipe,
        "data": data,
        "precision": precision,
        "compile": args.compile,
        "steps": args.steps,
        "batch_size": config.batch_size,
        "ms_per_step": {k: v / args.steps * 1000 for k, v in totals.items()},
        "training_images_per_second": config.batch_size / step_seconds,
        "epoch_seconds": step_seconds * steps_per_epoch,
        "evaluation_seconds": evaluation_seconds,
        "step_flops": flops,
        "achieved_flops_per_second": achieved,
        "threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
        "matmul_peak_flops_per_second": peaks,
        "nominal_peak": nominal,
        "share_of_matmul_peak": {name: achieved / peak for name, peak in peaks.items()},
    }
    name = f"profile-{args.recipe}" + ("-compile" if args.compile else "")
    print(f"wrote {write_results(name, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
