"""``small_cnn``: a five-conv network for the embedded CPU demo, registered with timm.

At 64 px a tiny ViT (8 px patches, 4 blocks) does not learn the procedural shapes in a CPU budget
even with labels; this net, trained the same way, does (the numbers: benchmarks/RESULTS.md, "Demo:
shape is learnable by a small CNN with labels, not yet without"). It downsamples early (stride 2
twice, then once more) so a step is cheap, and pools with a global max, which keeps the strongest
local evidence of an edge or corner wherever the shape sits.

``timm.create_model("small_cnn", num_classes=0)`` maps ``[N, 3, H, W] -> [N, num_features]``
(any H, W); ``num_classes > 0`` adds a linear classifier.
"""
from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


def _conv(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv5x5/2 -> conv3x3/2 -> conv3x3 -> conv3x3/2 -> conv3x3, BatchNorm + ReLU each, global max pool.

    ``widths``: the stem, second and third stage widths; the last is ``num_features``.
    """

    def __init__(self, num_classes: int = 0, in_chans: int = 3, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.features = nn.Sequential(_conv(in_chans, w1, 5, 2), _conv(w1, w2, 3, 2), _conv(w2, w2, 3, 1),
                                      _conv(w2, w3, 3, 2), _conv(w3, w3, 3, 1))
        self.num_features = w3
        self.num_classes = int(num_classes)
        self.head = nn.Linear(w3, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, num_features, H/8, W/8]``."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = torch.amax(x, dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    if pretrained:
        raise ValueError("small_cnn has no pretrained weights")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return SmallCNN(**kwargs)
