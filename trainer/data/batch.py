"""The unit a data source hands the training loop: a set of caption groups."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """``G`` caption groups of ``n`` images each.

    Attributes:
        images: uint8 ``[G, n, H, W, 3]`` (host, ideally pinned, or already on the device).
        caption_ids: int64 ``[G]``; globally unique per caption, so the contrastive labels built
            from them are unique across ranks and across steps.
        captions: ``G`` caption strings (used by the image-text methods).
        meta: free-form per-batch numbers a source wants logged (e.g. reuse of the drawn groups).
    """

    images: torch.Tensor
    caption_ids: torch.Tensor
    captions: list[str]
    meta: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5 or self.images.shape[-1] != 3:
            raise ValueError(
                f"Batch.images must be uint8 [G, n, H, W, 3], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.caption_ids.shape != (self.images.shape[0],):
            raise ValueError(
                f"Batch.caption_ids must have shape [{self.images.shape[0]}], got {tuple(self.caption_ids.shape)}"
            )
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"Batch.captions has {len(self.captions)} entries for {self.images.shape[0]} groups")

    @property
    def num_groups(self) -> int:
        return int(self.images.shape[0])

    @property
    def images_per_group(self) -> int:
        return int(self.images.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """Move tensors to ``device`` (non-blocking from pinned host memory)."""
        return Batch(
            images=self.images.to(device, non_blocking=non_blocking),
            caption_ids=self.caption_ids.to(device, non_blocking=non_blocking),
            captions=self.captions,
            meta=dict(self.meta),
        )
