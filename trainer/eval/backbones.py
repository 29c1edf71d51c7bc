"""Frozen backbones for evaluation, resolved from one ``--checkpoint`` spec.

Accepted specs:

- a ``stablerep-train`` run directory holding ``backbone.json`` + ``backbone.safetensors``;
- either of those two files directly (the other is looked up next to it);
- an official StableRep checkpoint (``*.pth`` / ``*.pt`` from google-research/syn-rep-learn): a dict
  whose ``model`` entry holds the training model's state dict; the backbone is every ``visual.*`` key
  without that prefix (``visual.head*`` left out), as the official linear-probe script reads it, into
  ``vit_{small,base,large}_patch16_224`` (the size from the checkpoint's ``args.model`` or from the
  width of ``cls_token``; the depth from the ``blocks.N`` keys). Read with ``torch.load(weights_only=True)``
  (only ``argparse.Namespace`` allowed besides tensors, for the saved ``args``);
- ``timm:NAME`` or ``random:NAME``: the timm architecture at random init (``model_kwargs`` are passed
  to ``timm.create_model``), the baseline every trained backbone must beat;
- ``timm-pretrained:NAME``: timm's pretrained weights, only when already in the local cache
  (Hugging Face hub cache or torch hub cache): nothing is downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import trainer.models.small_cnn  # noqa: F401  (registers "small_cnn", the demo's backbone, with timm)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONE_JSON = "backbone.json"
BACKBONE_WEIGHTS = "backbone.safetensors"
RANDOM_PREFIXES = ("timm:", "random:")
PRETRAINED_PREFIX = "timm-pretrained:"


class BackboneSpecError(ValueError):
    """The ``--checkpoint`` spec cannot be resolved; the message says which file or name is wrong."""


@dataclass
class EvalBackbone:
    """A frozen feature extractor plus the preprocessing it expects.

    ``features(x)``: float ``[N, 3, S, S]`` normalized with ``mean``/``std`` -> float ``[N, D]``
    (pooled pre-logits features, ``D = num_features``).
    """

    model: nn.Module
    name: str
    model_kwargs: dict[str, Any]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_features: int
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            return model.forward_head(model.forward_features(x), pre_logits=True)
        return model(x)

    def to(self, device: torch.device | str) -> "EvalBackbone":
        self.model.to(device)
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model": self.name,
            "model_kwargs": self.model_kwargs,
            "input_size": self.input_size,
            "num_features": self.num_features,
            "mean": list(self.mean),
            "std": list(self.std),
            **self.info,
        }


def _input_size(model: nn.Module) -> int:
    """Square input side the model was built for (``patch_embed.img_size`` beats timm's default cfg)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None:
        return int(img_size[0] if isinstance(img_size, (tuple, list)) else img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _strip_classifier(model: nn.Module) -> nn.Module:
    if getattr(model, "num_classes", 0) and hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    return model


def _create(name: str, model_kwargs: dict[str, Any], spec: str, **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, **{**model_kwargs, **extra})
    except RuntimeError as err:
        if "Unknown model" in str(err) or "unknown model" in str(err):
            raise BackboneSpecError(f"{spec}: timm has no model named {name!r}") from err
        raise
    except TypeError as err:
        raise BackboneSpecError(f"{spec}: model_kwargs {model_kwargs} do not fit timm model {name!r}: {err}") from err


def _wrap(model: nn.Module, name: str, kwargs: dict[str, Any], source: str, stats: dict[str, Any] | None = None,
          input_size: int | None = None, info: dict[str, Any] | None = None) -> EvalBackbone:
    """Freeze ``model`` (classifier removed) into an ``EvalBackbone``; ``stats`` may give mean/std."""
    stats = stats or {}
    model = _freeze(_strip_classifier(model))
    return EvalBackbone(
        model=model,
        name=name,
        model_kwargs=kwargs,
        input_size=int(input_size or _input_size(model)),
        mean=tuple(stats.get("mean", IMAGENET_MEAN)),
        std=tuple(stats.get("std", IMAGENET_STD)),
        num_features=int(getattr(model, "num_features", stats.get("num_features", 0))),
        source=source,
        info=info or {},
    )


def _exported_files(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        meta, weights = path / BACKBONE_JSON, path / BACKBONE_WEIGHTS
    elif path.suffix == ".json":
        meta = path
        weights = path.with_suffix(".safetensors")
        if not weights.exists():
            weights = path.parent / BACKBONE_WEIGHTS
    elif path.suffix == ".safetensors":
        weights = path
        meta = path.with_suffix(".json")
        if not meta.exists():
            meta = path.parent / BACKBONE_JSON
    else:
        raise BackboneSpecError(
            f"checkpoint {path}: expected a run directory, {BACKBONE_JSON} or {BACKBONE_WEIGHTS}"
        )
    for needed in (meta, weights):
        if not needed.exists():
            raise BackboneSpecError(
                f"checkpoint {path}: missing {needed} (written by stablerep-train's export_backbone)"
            )
    return meta, weights


def _load_exported(path: Path) -> EvalBackbone:
    from safetensors.torch import load_file

    meta_path, weights_path = _exported_files(path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise BackboneSpecError(f"{meta_path} is not valid JSON: {err}") from err
    for key in ("model", "model_kwargs"):
        if key not in meta:
            raise BackboneSpecError(f"{meta_path} lacks the field {key!r}")
    name, kwargs = str(meta["model"]), dict(meta["model_kwargs"])
    model = _create(name, kwargs, str(meta_path), pretrained=False)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BackboneSpecError(f"{weights_path} does not match {name} with {kwargs}: {err}") from err
    size = meta.get("input_size") or meta.get("img_size")
    return _wrap(model, name, kwargs, str(weights_path), stats=meta, input_size=size)


OFFICIAL_SUFFIXES = (".pth", ".pt")
OFFICIAL_WIDTHS = {384: "small", 768: "base", 1024: "large"}


def official_backbone_state(checkpoint: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """The backbone state dict inside an official StableRep checkpoint (see the module docstring)."""
    state = checkpoint.get("model", checkpoint.get("state_dict")) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise BackboneSpecError(f"{where}: no 'model' state dict (keys: {sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__})")
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith("visual.") and not key.startswith("visual.head"):
            out[key[len("visual."):]] = value
    if "cls_token" not in out:
        raise BackboneSpecError(f"{where}: no 'visual.cls_token' key: not an official StableRep ViT checkpoint")
    return out


def _load_official(path: Path) -> EvalBackbone:
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported with its path
        raise BackboneSpecError(f"{path}: cannot read as an official StableRep checkpoint: {err}") from err
    state = official_backbone_state(checkpoint, str(path))
    size = getattr(checkpoint.get("args"), "model", None) or OFFICIAL_WIDTHS.get(int(state["cls_token"].shape[-1]))
    if size not in OFFICIAL_WIDTHS.values():
        raise BackboneSpecError(f"{path}: unknown ViT width {state['cls_token'].shape[-1]} (official: small, base, large)")
    name = f"vit_{size}_patch16_224"
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    kwargs = {"depth": depth} if depth != (24 if size == "large" else 12) else {}
    model = _create(name, kwargs, str(path), pretrained=False, num_classes=0)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BackboneSpecError(f"{path}: weights do not match {name} {kwargs}: {err}") from err
    return _wrap(model, name, kwargs, str(path), info={"format": "official StableRep checkpoint"})


def _random_init(spec: str, name: str, model_kwargs: dict[str, Any], seed: int) -> EvalBackbone:
    kwargs = {"num_classes": 0, **model_kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create(name, kwargs, spec, pretrained=False)
    return _wrap(model, name, kwargs, f"random init (seed {seed})", info={"init_seed": seed})


def cached_pretrained_file(name: str) -> tuple[str, bool] | None:
    """Path of locally cached timm weights for ``name`` and whether timm's custom loader is needed."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and Path(found).exists():
                return found, False
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        if local.exists():
            return str(local), bool(cfg.custom_load)
    return None


def _pretrained(spec: str, name: str, model_kwargs: dict[str, Any]) -> EvalBackbone:
    if not timm.is_model(name.split(".")[0]):
        raise BackboneSpecError(f"{spec}: timm has no model named {name!r}")
    cached = cached_pretrained_file(name)
    if cached is None:
        raise BackboneSpecError(
            f"{spec}: pretrained weights for {name!r} are not in the local cache "
            f"(Hugging Face hub cache or {torch.hub.get_dir()}/checkpoints); nothing is downloaded at run time"
        )
    path, custom = cached
    kwargs = {"num_classes": 0, **model_kwargs}
    model = _create(name, kwargs, spec, pretrained=True, pretrained_cfg_overlay={"file": path, "custom_load": custom})
    return _wrap(model, name, kwargs, path, stats=model.pretrained_cfg)


def load_eval_backbone(spec: str | Path, model_kwargs: dict[str, Any] | None = None, seed: int = 0) -> EvalBackbone:
    """Resolve ``spec`` (see module docstring) into a frozen :class:`EvalBackbone` in eval mode on CPU.

    ``model_kwargs`` apply to ``timm:``/``random:``/``timm-pretrained:`` specs (e.g.
    ``{"img_size": 64, "patch_size": 8}``); ``seed`` fixes the random init.
    """
    spec_str = str(spec)
    kwargs = dict(model_kwargs or {})
    for prefix in RANDOM_PREFIXES:
        if spec_str.startswith(prefix):
            return _random_init(spec_str, spec_str[len(prefix):], kwargs, seed)
    if spec_str.startswith(PRETRAINED_PREFIX):
        return _pretrained(spec_str, spec_str[len(PRETRAINED_PREFIX):], kwargs)
    path = Path(spec_str)
    if not path.exists():
        raise BackboneSpecError(
            f"checkpoint {path} does not exist (give a run directory, {BACKBONE_JSON}/{BACKBONE_WEIGHTS}, "
            f"'timm:NAME' for random init, or 'timm-pretrained:NAME' for locally cached weights)"
        )
    if kwargs:
        raise BackboneSpecError(f"checkpoint {path}: --model-kwargs only apply to timm:/random:/timm-pretrained: specs")
    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        return _load_official(path)
    return _load_exported(path)
