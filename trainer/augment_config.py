"""Config group ``augment``: the GPU augmentation applied to every image of a batch.

Part of :class:`trainer.config.TrainConfig`; :meth:`trainer.augment.GPUAugment.from_config` builds
the augmentation from it. This module imports no torch (the config and ``--help`` read it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trainer.config_checks import fail, fraction, positive

#: RandomResizedCrop lower scale when ``scale_min`` is not set: the paper's strong recipe / the official weak one
STRONG_SCALE_MIN, WEAK_SCALE_MIN = 0.08, 0.5


@dataclass
class AugmentConfig:
    """GPU augmentation applied to every image of a batch (``trainer.augment.GPUAugment``)."""

    size: Optional[int] = None  # output crop side S; None = model.img_size
    strong: bool = True  # the paper's strong augmentation; False = the official weak one (crop only, no flip)
    scale_min: Optional[float] = None  # RandomResizedCrop scale (scale_min, 1); None = 0.08 strong, 0.5 weak;
    # a value from a layer below the one that chose strong/weak is dropped (build_config)
    downsample: Optional[int] = None  # shrink every image to this side before augmenting (None = as stored)
    down_res: list[int] = field(default_factory=list)  # official random down-and-up resize sides ([] = off)
    down_prob: float = 0.05  # probability per image of that resize (official downsample_prob)
    crops_per_image: int = 1  # augmented crops of every drawn image (official num_crop; SimCLR: 2)
    blur_p: float = 0.5  # probability of the strong recipe's Gaussian blur

    def crop_scale_min(self) -> float:
        """Lower RandomResizedCrop scale: ``scale_min``, else 0.08 (strong) / 0.5 (official weak)."""
        if self.scale_min is not None:
            return self.scale_min
        return STRONG_SCALE_MIN if self.strong else WEAK_SCALE_MIN

    def summary(self, crop_size: int) -> dict:
        """The augmentation as it will run, with crops of ``crop_size`` pixels (for ``--print-config``)."""
        out = {"crop": f"RandomResizedCrop({crop_size}, scale=({self.crop_scale_min():g}, 1))",
               "flip_p": 0.5 if self.strong else 0.0, "crops_per_image": self.crops_per_image}
        if self.strong:
            out["color"] = ("ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, random order per image; grayscale p=0.2; "
                            "blur sigma U(0.1, 2) p=0.5")
        if self.downsample is not None:
            out["downsample"] = f"every image to {self.downsample} px"
        if self.down_res:
            out["down_up"] = f"p={self.down_prob:g} per image, shorter side to one of {self.down_res} and back"
        return out

    def validate(self, model_img_size: int) -> None:
        """Raise ``ConfigError`` naming the first bad field; the crop side must be the model's input size."""
        positive("augment.size", self.size, optional=True)
        if self.size is not None and self.size != model_img_size:
            fail("augment.size", self.size, f"differs from model.img_size = {model_img_size}")
        if self.scale_min is not None and not 0 < self.scale_min <= 1:
            fail("augment.scale_min", self.scale_min, "must be in (0, 1]")
        fraction("augment.blur_p", self.blur_p)
        positive("augment.downsample", self.downsample, optional=True)
        positive("augment.crops_per_image", self.crops_per_image)
        positive("augment.down_res", self.down_res, each=True)
        fraction("augment.down_prob", self.down_prob)
