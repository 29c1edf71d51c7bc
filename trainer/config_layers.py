"""Values that depend on which layer of the config set what (``build_config`` calls :func:`resolve_layers`).

A preset is not the user's choice: a value set only by the defaults or the preset gives way to
- the official images per caption and crops per image of the chosen method (SimCLR 1 and 2, CLIP 1
  and 1: ``trainer.objectives.methods``);
- the caption count of the offline data (``data.dataset_captions`` from a preset is the online
  source's nominal epoch);
and ``augment.scale_min`` goes with the strong / weak choice made with it.
A config file (``--config``) and command-line flags are the user's choices.
"""
from __future__ import annotations

import warnings

from typing import TYPE_CHECKING

from trainer.config_checks import DEPRECATED_FIELDS, RESOLVED_KEY

if TYPE_CHECKING:
    from trainer.config import TrainConfig


def resolve_layers(cfg: TrainConfig, layers: list[dict], preset_first: bool) -> TrainConfig:
    """Apply the rules above to ``cfg``, built from ``layers`` (nested maps, lowest first; the first
    one is the preset when ``preset_first``)."""
    set_per_layer = [explicit_fields(data) for data in layers]
    user_set = set().union(*set_per_layer[1 if preset_first else 0:])
    resolve_method_views(cfg, user_set)
    if cfg.data.source == "offline" and ("data", "dataset_captions") not in user_set:
        cfg.data.dataset_captions = None  # count the offline data (TrainConfig.epoch_captions)
    drop_stale_scale_min(cfg, set_per_layer)
    return cfg


#: config fields a method's official recipe may fix -> the ``OfficialViews`` attribute holding the value
METHOD_VIEW_FIELDS = {("data", "draw_per_caption"): "draw_per_caption",
                      ("augment", "crops_per_image"): "crops_per_image"}


def explicit_fields(*layers: dict | None) -> set[tuple[str, str]]:
    """``(group, field)`` of every value the nested maps ``layers`` set (old field names mapped to new)."""
    out = set()
    for layer in layers:
        for group, values in (layer or {}).items():
            if group == RESOLVED_KEY or not isinstance(values, dict):
                continue
            for key in values:
                key = str(key).replace("-", "_")
                out.add((group, DEPRECATED_FIELDS.get((group, key), key)))
    return out


def resolve_method_views(cfg: TrainConfig, explicit: set[tuple[str, str]]) -> TrainConfig:
    """Give ``cfg`` the images per caption and crops per image that its method's official recipe uses
    (``METHODS[name].official``), unless the user set them in a config file or on the command line
    (``explicit``; defaults and presets are not explicit). An explicit value that differs from the
    official one stays, with a warning that names the official value."""
    from trainer.objectives.methods import METHODS

    try:
        official = METHODS.get(cfg.method.name).official
    except ValueError:
        return cfg  # an unknown method is validate()'s error to report
    for (group, name), attr in METHOD_VIEW_FIELDS.items():
        value = getattr(official, attr)
        if value is None:
            continue
        if (group, name) not in explicit:
            setattr(getattr(cfg, group), name, value)
        elif getattr(getattr(cfg, group), name) != value:
            images, crops = cfg.views_in_loss()
            warnings.warn(f"config field {group}.{name} = {getattr(getattr(cfg, group), name)!r}: the official "
                          f"{cfg.method.name} recipe uses {value}; {images} image(s) per caption x {crops} crop(s) "
                          f"reach its loss, and the lr rule counts those", stacklevel=2)
    return cfg


def drop_stale_scale_min(cfg: TrainConfig, set_per_layer: list[set[tuple[str, str]]]) -> TrainConfig:
    """``augment.scale_min`` belongs to the augmentation chosen with it: a value set in a layer below
    the last one that chose strong or weak augmentation (``augment.strong``) is dropped, so the chosen
    augmentation's official scale applies (strong 0.08, weak 0.5). ``--weak-aug`` on the command
    line over the paper preset thus crops at 0.5-1 unless ``--scale-min`` is on the command line
    too; a config file that sets ``strong: false`` and ``scale_min`` keeps its value.
    ``set_per_layer``: the fields each layer set, lowest layer first."""
    chose = [i for i, fields in enumerate(set_per_layer) if ("augment", "strong") in fields]
    if chose and not any(("augment", "scale_min") in fields for fields in set_per_layer[chose[-1]:]):
        cfg.augment.scale_min = None
    return cfg
