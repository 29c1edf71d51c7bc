"""``toy-pairs``: StableRep's multi-positive loss on the first two images of each caption only.

The method declares its facts like the in-tree ones (``MethodFacts``): two images of each caption
reach the loss however many are drawn, so the lr rule and ``images_per_step`` count two.
"""
from __future__ import annotations

import dataclasses

from trainer.objectives.methods import StableRepMethod  # a MethodFacts subclass


class ToyPairsMethod(StableRepMethod):
    """Views of images 0 and 1 of every group; positives = every view of the same caption."""

    @staticmethod
    def views_in_loss(draw_per_caption: int, crops_per_image: int) -> tuple[int, int]:
        return min(2, int(draw_per_caption)), max(1, int(crops_per_image))

    def __call__(self, model, batch, augment):
        pairs = dataclasses.replace(batch, images=batch.images[:, :2])  # uint8 [G, 2, H, W, 3]
        return super().__call__(model, pairs, augment)
