"""Issue 25's search space: layouts of the fast network (imgcls.model.networks.ConvNet with the whitening stem),
registered under ``cand_*`` names for the benchmark's processes only. The winner is copied into the library's
model table (imgcls.model.registry.MODELS); the others stay here, so every candidate tried can be rerun.

A layout: ``multipliers`` of train.width per ConvGroup (each group pools 2x2), ``convs`` per group, and the
whitening stem's stride (1: 2x2 valid, the side loses a pixel; 2: space-to-depth, the side halves).

    .venv/bin/python bench/candidate_stage.py train|evaluate   (a stage with the candidates registered)
"""

from __future__ import annotations

from dataclasses import dataclass

from imgcls.model.networks import ConvNet, Network
from imgcls.model.registry import FAST_RECIPE, MODELS, ModelSpec


@dataclass(frozen=True)
class Layout:
    multipliers: tuple[int, ...]
    convs: tuple[int, ...]
    stem_stride: int = 1
    note: str = ""

    def min_image_size(self) -> int:
        """The smallest side that leaves one pixel after the stem and every pool."""
        side = 1
        for _ in self.multipliers:
            side *= 2
        return side * self.stem_stride + (1 if self.stem_stride == 1 else 0)


LAYOUTS: dict[str, Layout] = {
    "fast": Layout((1, 4, 4), (2, 2, 2), note="today's fast network (airbench94 layout)"),
    "c122": Layout((1, 4, 4), (1, 2, 2), note="one conv in the first (largest) group"),
    "c112": Layout((1, 4, 4), (1, 1, 2), note="one conv in the first two groups"),
    "c111": Layout((1, 4, 4), (1, 1, 1), note="one conv per group"),
    "c221": Layout((1, 4, 4), (2, 2, 1), note="one conv in the last (3x3) group"),
    "c123": Layout((1, 4, 4), (1, 2, 3), note="depth moved to the small maps"),
    "m124": Layout((1, 2, 4), (2, 2, 2), note="widths doubling per group"),
    "m144c13": Layout((1, 4, 4), (1, 3, 2), note="one conv first, three in the middle group"),
    "m188": Layout((1, 8, 8), (2, 2, 2), note="narrow first group (the 27-pixel maps), wide small maps"),
    "m166": Layout((1, 6, 6), (2, 2, 2), note="narrow first group, 1.5x wider small maps"),
    "m148": Layout((1, 4, 8), (2, 2, 2), note="the last (3x3) group twice as wide"),
    "m188c122": Layout((1, 8, 8), (1, 2, 2), note="one conv at 27 pixels, wide small maps"),
    "m166c122": Layout((1, 6, 6), (1, 2, 2), note="m166 with one conv at 27 pixels"),
    "m166c221": Layout((1, 6, 6), (2, 2, 1), note="m166 with one conv at 3 pixels"),
    "m266": Layout((2, 6, 6), (2, 2, 2), note="m166 with a twice wider first group"),
    "m156": Layout((1, 5, 6), (2, 2, 2), note="between fast and m166"),
    "s2m244": Layout((2, 4, 4), (2, 2, 2), stem_stride=2, note="space-to-depth stem: 14 -> 7 -> 3 -> 1"),
    "s2m24c23": Layout((2, 4), (2, 3), stem_stride=2, note="space-to-depth stem, two groups: 14 -> 7 -> 3"),
    "s2m48c22": Layout((4, 8), (2, 2), stem_stride=2, note="space-to-depth stem, two wide groups"),
    "s2m24c33": Layout((2, 4), (3, 3), stem_stride=2, note="space-to-depth stem, two groups of three convs"),
}


def build(layout: Layout, width: int, whiten_bias_epochs: float, **arguments) -> Network:
    return ConvNet(
        **arguments,
        widths=tuple(m * width for m in layout.multipliers),
        convs=layout.convs,
        stem_stride=layout.stem_stride,
        fast=True,
        whiten_bias_epochs=whiten_bias_epochs,
    )


def register() -> None:
    """Every layout as model ``cand_<name>`` in this process's model table, with the fast recipe."""
    for name, layout in LAYOUTS.items():
        MODELS[f"cand_{name}"] = ModelSpec(
            lambda width, whiten_bias_epochs, layout=layout, **a: build(layout, width, whiten_bias_epochs, **a),
            min_image_size=layout.min_image_size(),
            takes_width=True,
            recipe=FAST_RECIPE,
        )
