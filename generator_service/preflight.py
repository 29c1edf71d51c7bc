"""Checks of the backend name and the model that run before any worker process starts.

A bad ``--backend`` is refused by argparse (:func:`backend_name`); a ``--model`` that cannot load is
found by :func:`check_model` with cheap file-system and cache look-ups, so the user gets one line
and exit status 2 instead of a traceback from every worker.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from generator_service.backends import BACKENDS, backend_facts
from generator_service.config import RANDOM_MODELS, GeneratorConfig


class PreflightError(ValueError):
    """The generator cannot start with these settings (printed as one line, exit status 2)."""


def backend_name(text: str) -> str:
    """argparse ``type`` of ``--backend``: a registered backend name."""
    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {', '.join(BACKENDS.names())}")
    return text


def check_model(config: GeneratorConfig) -> None:
    """Raise :class:`PreflightError` when ``config.model`` of a diffusers-pipeline backend cannot be loaded.

    Random-weight models always load. A local folder needs a ``model_index.json``. A hub id
    (``organization/name``) must be in the local Hugging Face cache when ``HF_HUB_OFFLINE`` is set;
    otherwise the workers fetch it.
    """
    if not backend_facts(config.backend).loads_diffusers_pipeline or config.model in RANDOM_MODELS:
        return
    model = str(config.model)
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PreflightError(f"--model {model}: a folder but not a diffusers pipeline (no model_index.json)")
        return
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1 or path.exists():
        raise PreflightError(f"--model {model}: no such folder (hub ids look like 'organization/name'; "
                             f"random weights: {', '.join(RANDOM_MODELS)})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            raise PreflightError(f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


#: characters of a bad caption shown in a message (a caption file may hold a line of megabytes)
CAPTION_SHOWN = 80


def check_captions(config: GeneratorConfig, captions) -> None:
    """Raise :class:`PreflightError` naming the first caption (by line) the backend cannot draw.

    Only a backend whose facts say ``caption_grammar`` (procedural) has a grammar
    (``generator_service.procedural.grammar``); any text suits the others. ``captions``: a
    ``generator_service.captions.CaptionSet``.
    """
    if not backend_facts(config.backend).caption_grammar:
        return
    from generator_service.procedural.grammar import TEMPLATE, make_caption, parse_caption

    for caption_id, text in sorted(zip(captions.caption_ids, captions.captions)):
        try:
            parse_caption(text)
        except ValueError as exc:
            shown = text if len(text) <= CAPTION_SHOWN else f"{text[:CAPTION_SHOWN]}... ({len(text)} characters)"
            message = str(exc)
            cut = message.rfind(": unknown ")
            reason = message[cut + 2:] if cut >= 0 else f"not of the form {TEMPLATE!r}"
            raise PreflightError(
                f"{captions.where(caption_id)}: {shown!r}: {reason}. The procedural backend draws only "
                f"captions of its grammar (e.g. {make_caption('red', 'triangle', 'stripes', 'dark')!r}; "
                "`stablerep-generator captions` writes them); other text needs --backend diffusers") from None
