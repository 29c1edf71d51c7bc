"""CLIP-style text tower for StableRep+ and CLIP: tokenizer + causal transformer + EOT pooling + projection.

The transformer is ``transformers.CLIPTextModel`` built from a config (nothing is downloaded), then
initialized as OpenAI's CLIP and the official StableRep+ text tower are (:func:`openai_text_init_`). Tokenizers work offline: the default ``"clip"`` is CLIP's BPE tokenizer (vocabulary 49408,
context 77, as the official StableRep+) from ``open_clip``, whose vocabulary file ships inside the
package; ``"bytes"`` (:class:`ByteTokenizer`) maps UTF-8 bytes to ids (small CPU towers);
``tokenizer=<folder>`` loads a local Hugging Face tokenizer folder with ``AutoTokenizer``.
The projection into the joint space is ``linear`` (to ``embed_dim``) or ``mlp`` (the official
``vl_projection``: the projection head's Linear-BN-ReLU x 2 + Linear, hidden ``mlp_hidden``, output
``mlp_out`` = 256, the official ``ssl_emb_dim``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trainer.models.projection_head import projection_head


@dataclass
class TextConfig:
    """Text tower size. Defaults follow CLIP ViT-B/16's text encoder."""

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    context_length: int = 77
    embed_dim: int = 512  # joint image-text width of the linear projection
    tokenizer: str = "clip"  # "clip" (BPE, open_clip), "bytes", or the path of a local Hugging Face tokenizer folder
    projection: str = "linear"  # "linear" or "mlp" (official vl_projection), for both image and text
    mlp_hidden: int = 4096  # hidden width of the mlp projection (official ssl_mlp_dim)
    mlp_out: int = 256  # output width of the mlp projection (official ssl_emb_dim)

    @property
    def joint_dim(self) -> int:
        """Width of the joint image-text space: ``embed_dim`` (linear) or ``mlp_out`` (mlp)."""
        return self.mlp_out if self.projection == "mlp" else self.embed_dim


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then PAD, BOS, EOS.

    ``tokenize(texts) -> int64 [B, context_length]``: BOS, the first ``context_length - 2`` bytes,
    EOS, then PAD. Truncation never drops the EOS token the tower pools from.
    """

    pad_id, bos_id, eos_id = 256, 257, 258
    vocab_size = 259

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            body = list(text.encode("utf-8"))[: self.context_length - 2]
            ids = [self.bos_id, *body, self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class ClipTokenizer:
    """CLIP's BPE tokenizer (``open_clip.tokenizer.SimpleTokenizer``): vocabulary 49408, start token
    49406, end token 49407, padded with 0 to ``context_length``; truncation keeps the end token."""

    def __init__(self, context_length: int = 77) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = len(self.tokenizer.encoder)
        self.bos_id, self.eos_id, self.pad_id = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id, 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length).long()


class HFTokenizer:
    """A local Hugging Face tokenizer folder, padded / truncated to ``context_length``."""

    def __init__(self, path: str | Path, context_length: int = 77) -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text tokenizer folder not found: {path} (use tokenizer='bytes' "
                                    "or a local folder holding a Hugging Face tokenizer)")
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a Hugging Face tokenizer from {path}: {err}") from err
        tok = self.tokenizer
        self.context_length = context_length
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        if self.pad_id is None:
            raise ValueError(f"tokenizer in {path} has no pad, eos or sep token to pad with")
        if tok.pad_token_id is None:
            tok.pad_token_id = self.pad_id
        self.bos_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.context_length, return_tensors="pt")["input_ids"].long()


def build_tokenizer(config: TextConfig) -> ByteTokenizer | ClipTokenizer | HFTokenizer:
    """``"clip"`` -> :class:`ClipTokenizer`; ``"bytes"`` -> :class:`ByteTokenizer`; anything else is a
    local tokenizer folder."""
    if config.tokenizer == "clip":
        return ClipTokenizer(config.context_length)
    if config.tokenizer == "bytes":
        return ByteTokenizer(config.context_length)
    return HFTokenizer(config.tokenizer, config.context_length)


def eot_positions(tokens: torch.Tensor, eos_id: int | None, pad_id: int) -> torch.Tensor:
    """Index of the token each sequence is pooled from.

    The first EOS when the row has one, else the last non-pad token.
    Args: tokens int ``[B, L]``. Returns: int64 ``[B]``.
    """
    length = tokens.shape[1]
    positions = torch.arange(length, device=tokens.device).expand_as(tokens)
    last_real = torch.where(tokens != pad_id, positions, 0).amax(dim=1)
    if eos_id is None:
        return last_real
    is_eos = tokens == eos_id
    first_eos = torch.where(is_eos, positions, length).amin(dim=1)
    return torch.where(is_eos.any(dim=1), first_eos, last_real)


def build_projection(in_dim: int, config: TextConfig) -> nn.Module:
    """``[B, in_dim] -> [B, config.joint_dim]``: bias-free Linear to ``embed_dim`` (init N(0, in_dim^-0.5))
    for ``linear``, or the 3-layer projection-head MLP to ``mlp_out`` for ``mlp``."""
    if config.projection == "linear":
        layer = nn.Linear(in_dim, config.embed_dim, bias=False)
        nn.init.normal_(layer.weight, std=in_dim ** -0.5)
        return layer
    if config.projection == "mlp":
        return projection_head(in_dim, config.mlp_hidden, config.mlp_out, layers=3)
    raise ValueError(f"text projection must be 'linear' or 'mlp', got {config.projection!r}")


@torch.no_grad()
def openai_text_init_(model: nn.Module) -> nn.Module:
    """Re-initialize a ``transformers.CLIPTextModel`` in place as OpenAI's CLIP (and the official
    StableRep+ text tower): token embedding N(0, 0.02), position embedding N(0, 0.01), for width ``w``
    and ``L`` layers the attention in-projection (q, k, v) N(0, w^-0.5) and out-projection
    N(0, w^-0.5 (2L)^-0.5) with zero biases (``nn.MultiheadAttention``'s), the MLP's first layer
    N(0, (2w)^-0.5) and second N(0, w^-0.5 (2L)^-0.5) with PyTorch's default Linear biases, and
    LayerNorms at weight 1, bias 0."""
    config = model.config
    width, layers = config.hidden_size, config.num_hidden_layers
    attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    text = getattr(model, "text_model", model)  # transformers < 5 wraps the modules in text_model
    nn.init.normal_(text.embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(text.embeddings.position_embedding.weight, std=0.01)
    for layer in text.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for linear, std in ((attn.q_proj, attn_std), (attn.k_proj, attn_std), (attn.v_proj, attn_std),
                            (attn.out_proj, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        for linear, std in ((mlp.fc1, fc_std), (mlp.fc2, proj_std)):
            linear.reset_parameters()  # PyTorch's default bias U(-fan_in^-0.5, fan_in^-0.5)
            nn.init.normal_(linear.weight, std=std)
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
    return model


class TextTower(nn.Module):
    """Captions -> embeddings ``[B, config.joint_dim]`` in the joint image-text space."""

    def __init__(self, config: TextConfig | None = None) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.config = config = config or TextConfig()
        self.tokenizer = build_tokenizer(config)
        hf_config = CLIPTextConfig(
            vocab_size=self.tokenizer.vocab_size,
            hidden_size=config.width,
            intermediate_size=int(config.width * config.mlp_ratio),
            projection_dim=config.embed_dim,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            max_position_embeddings=config.context_length,
            pad_token_id=self.tokenizer.pad_id,
            bos_token_id=self.tokenizer.bos_id,
            eos_token_id=self.tokenizer.eos_id,
        )
        self.transformer = openai_text_init_(CLIPTextModel(hf_config))  # causal self-attention inside
        self.projection = build_projection(config.width, config)

    @property
    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to this module) that AdamW should not decay: the position embedding."""
        from transformers.models.clip.modeling_clip import CLIPTextEmbeddings

        skip = {id(m.position_embedding.weight) for m in self.modules() if isinstance(m, CLIPTextEmbeddings)}
        return {name for name, param in self.named_parameters() if id(param) in skip}

    def tokenize(self, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        """Captions -> int64 ``[B, context_length]`` on ``device``."""
        tokens = self.tokenizer(texts)
        return tokens.to(device) if device is not None else tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, L]`` -> float ``[B, joint_dim]`` (the EOT token's final state, projected)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.config.context_length:
            raise ValueError(f"expected tokens [B, <= {self.config.context_length}], got {tuple(tokens.shape)}")
        hidden = self.transformer(input_ids=tokens).last_hidden_state  # [B, L, width], final LN applied
        pos = eot_positions(tokens, self.tokenizer.eos_id, self.tokenizer.pad_id)
        pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), pos]
        return self.projection(pooled)
