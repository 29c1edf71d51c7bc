"""StableRep model: a timm backbone, the paper's projection head, and an optional CLIP text tower.

``build_model`` -> :class:`StableRepModel`. The backbone is exported on its own
(``backbone.safetensors`` + ``backbone.json``) so evaluation and downstream users load it with
``timm.create_model(name, pretrained=False, **model_kwargs)`` and ``load_state_dict``.
"""
from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import trainer.models.small_cnn  # noqa: F401  (registers the "small_cnn" timm model)
from trainer.objectives.losses import INITIAL_LOGIT_SCALE, MAX_LOGIT_SCALE
from trainer.models.projection_head import projection_head
from trainer.models.text_tower import TextConfig, TextTower, build_projection
from trainer.models.view_norm import project_per_view

#: norm layers whose parameters are never weight-decayed
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
BACKBONE_WEIGHTS = "backbone.safetensors"
BACKBONE_META = "backbone.json"


def per_view_chunk(module: nn.Module, features: torch.Tensor, views: int) -> torch.Tensor:
    """``module`` on group-major ``features [G * views, F]`` with BatchNorm statistics per view chunk
    (the ``G`` rows at index ``j`` of every group), as if it ran once per chunk -> ``[G * views, out]``;
    computed in one (Sync)BatchNorm call per layer over the stacked views (`trainer.models.view_norm`)."""
    if views == 1:
        return module(features)
    return project_per_view(module, features, views)


class StableRepModel(nn.Module):
    """Backbone + projection head (+ text tower, image projection and logit scale for image-text methods).

    Attributes:
        backbone: timm model with ``num_classes=0``: ``[N, 3, S, S] -> [N, num_features]``.
        head: projection head ``[N, num_features] -> [N, head_out]``.
        text: :class:`TextTower` or None.
        image_projection: ``num_features -> text.config.joint_dim``, a Linear or the mlp projection (None
            without text tower).
        logit_scale: scalar parameter, log inverse temperature of image-text logits (None without text).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, model_name: str, model_kwargs: dict,
                 text: TextTower | None = None, head_per_view: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_per_view = bool(head_per_view)
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.input_size: int | None = None  # set by build_model: the training resolution
        self.text = text
        if text is not None:
            self.image_projection = build_projection(backbone.num_features, text.config)
            self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        else:
            self.image_projection = None
            self.logit_scale = None

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the logit-scale parameter to ``[0, ln 100]`` in place (official: after every optimizer
        step). No-op without a text tower."""
        if self.logit_scale is not None:
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def _require_text(self) -> TextTower:
        if self.text is None:
            raise RuntimeError("this model has no text tower: build it with build_model(..., text=TextConfig())")
        return self.text

    def project(self, features: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Projection head on backbone features ``[N, F]`` -> ``[N, head_out]``.

        ``features`` are group-major: ``N = G x views`` rows, the ``views`` images of group 0 first.
        With ``head_per_view`` (the official recipe) the BatchNorm statistics are per view chunk, i.e.
        over the ``G`` rows at index ``j`` of every group, as if the head ran once per chunk; they are
        computed in one (Sync)BatchNorm call per layer (`trainer.models.view_norm`). Else one call over all
        ``N`` rows.
        """
        if not self.head_per_view:
            return self.head(features)
        return per_view_chunk(self.head, features, views)

    def embed_image(self, features: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Image projection into the joint space, ``[N, F] -> [N, E]``; with ``head_per_view`` an ``mlp``
        projection runs once per view chunk, as in the official StableRep+ (BatchNorm per chunk)."""
        if isinstance(self.image_projection, nn.Linear) or not self.head_per_view:
            return self.image_projection(features)
        return per_view_chunk(self.image_projection, features, views)

    def forward(self, images: torch.Tensor, text_tokens: torch.Tensor | None = None, *, ssl: bool = True,
                views: int = 1):
        """Run the model. Goes through ``__call__`` so data-parallel wrappers see every branch.

        Args:
            images: float ``[N, 3, S, S]``, normalized, group-major (``N = G x views``).
            text_tokens: int64 ``[G, L]`` or None.
            ssl: with text tokens, also return the projection-head output.
            views: images per group in ``images`` (for the per-view head, see :meth:`project`).
        Returns:
            without ``text_tokens``: head output ``[N, head_out]``;
            with them: dict with ``image_embed`` ``[N, E]``, ``text_embed`` ``[G, E]``, ``logit_scale``
            (scalar parameter) and, when ``ssl``, ``ssl`` ``[N, head_out]``.
        """
        features = self.backbone(images)
        if text_tokens is None:
            return self.project(features, views)
        text = self._require_text()
        out = {"image_embed": self.embed_image(features, views), "text_embed": text(text_tokens),
               "logit_scale": self.logit_scale}
        if ssl:
            out["ssl"] = self.project(features, views)
        return out

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` -> image embedding ``[N, E]`` in the joint image-text space."""
        self._require_text()
        return self.image_projection(self.backbone(images))

    def encode_text(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """int64 ``[G, L]`` -> text embedding ``[G, E]``."""
        return self._require_text()(text_tokens)

    def tokenize(self, captions: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Captions -> int64 ``[G, L]`` for :meth:`encode_text` / :meth:`forward`."""
        return self._require_text().tokenize(captions, device)

    def param_groups(self, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
        """AdamW parameter groups ``[decay, no_decay]``.

        The official rule (``decay_embeddings=True``): ``weight_decay`` on every parameter with two or
        more dimensions that is not a bias or a norm parameter, so the class token, the position
        embeddings (image and text) and the token embedding are decayed; biases, norm parameters,
        other 1-D parameters and the logit scale are not. ``decay_embeddings=False`` also spares the
        backbone's ``no_weight_decay()`` names (timm: ``cls_token``, ``pos_embed``, ...) and the text
        tower's position embedding.
        """
        skip = set()
        if not decay_embeddings:
            if hasattr(self.backbone, "no_weight_decay"):
                skip |= {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
            if self.text is not None:
                skip |= {f"text.{name}" for name in self.text.no_weight_decay_names}
        norm_params = {id(p) for m in self.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            spared = param.ndim < 2 or name.endswith("bias") or id(param) in norm_params or name in skip
            (no_decay if spared else decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def backbone_meta(self) -> dict:
        """``backbone.json`` content: ``{"model", "model_kwargs", "num_features", "input_size"}``."""
        meta = {"model": self.model_name, "model_kwargs": dict(self.model_kwargs), "num_features": self.num_features}
        if self.input_size is not None:  # the training resolution; evaluation views use it
            meta["input_size"] = int(self.input_size)
        return meta

    def export_backbone(self, path_dir: str | Path) -> Path:
        """Write ``backbone.safetensors`` and ``backbone.json`` into ``path_dir``; returns the weights path."""
        path_dir = Path(path_dir)
        path_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        weights = path_dir / BACKBONE_WEIGHTS
        tmp = weights.with_suffix(".safetensors.tmp")
        save_file(state, str(tmp))
        tmp.replace(weights)
        (path_dir / BACKBONE_META).write_text(json.dumps(self.backbone_meta(), indent=2) + "\n")
        return weights


def build_model(name: str = "vit_base_patch16_224", img_size: int = 224, model_kwargs: dict | None = None,
                head_hidden: int = 4096, head_out: int = 256, head_layers: int = 3, sync_bn: bool = False,
                text: TextConfig | dict | None = None, head_per_view: bool = False) -> StableRepModel:
    """Build the StableRep model.

    Args:
        name: timm model name (created with ``pretrained=False``, ``num_classes=0``).
        img_size: training resolution passed to timm.
        model_kwargs: extra timm kwargs (e.g. ``{"patch_size": 8}``).
        head_hidden, head_out, head_layers: projection head sizes (paper: 4096, 256, 3; ``head_layers=0``
            = no head, e.g. for the clip method, so no parameter goes unused under DDP).
        sync_bn: convert every BatchNorm to SyncBatchNorm (multi-GPU runs; the official recipe).
        head_per_view: apply the head to each view chunk separately (the official recipe), see
            :meth:`StableRepModel.project`.
        text: a :class:`TextConfig` (or its dict) to add the text tower for clip / stablerep+.
    """
    kwargs = {"num_classes": 0, "img_size": img_size, **(model_kwargs or {})}
    try:
        try:
            backbone = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as err:  # convolutional nets take any input size and no img_size argument
            if "img_size" not in str(err) or "img_size" in (model_kwargs or {}):
                raise
            kwargs.pop("img_size")
            backbone = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"timm cannot build model {name!r} with {kwargs}: {err}") from err
    head = projection_head(backbone.num_features, head_hidden, head_out, head_layers)
    if isinstance(text, dict):
        text = TextConfig(**text)
    model = StableRepModel(backbone, head, name, kwargs, TextTower(text) if text is not None else None,
                           head_per_view=head_per_view)
    model.input_size = int(img_size)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def load_backbone(run_or_file: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Load an exported backbone as a timm model in eval mode.

    ``run_or_file``: a run / export directory holding ``backbone.safetensors`` + ``backbone.json``,
    or the path of either file.
    """
    path = Path(run_or_file)
    directory = path if path.is_dir() else path.parent
    weights, meta_path = directory / BACKBONE_WEIGHTS, directory / BACKBONE_META
    for needed in (weights, meta_path):
        if not needed.is_file():
            raise FileNotFoundError(f"exported backbone file missing: {needed}")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["model"], dict(meta["model_kwargs"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_path}: expected {{'model': str, 'model_kwargs': dict, ...}}: {err}") from err
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()
