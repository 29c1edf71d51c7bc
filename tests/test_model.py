"""Model, head, parameter groups, backbone export / load, and the text tower."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from trainer.models.stablerep_model import build_model, load_backbone, projection_head
from trainer.models.text_tower import ByteTokenizer, HFTokenizer, TextConfig, TextTower, eot_positions

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_TEXT = TextConfig(width=32, layers=1, heads=2, context_length=12, embed_dim=16, tokenizer="bytes")


def tiny(text=None, **kw):
    torch.manual_seed(0)
    return build_model("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT, head_hidden=64,
                       head_out=24, text=text, **kw)


def test_forward_backward_shapes():
    model = tiny()
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (4, 24)
    out.square().sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_features == 32 and model.text is None and model.logit_scale is None


def test_paper_head_layout():
    head = projection_head(768, 4096, 256, 3)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features, head[6].out_features) == \
        (768, 4096, 4096, 256)
    assert [type(m) for m in projection_head(8, 16, 4, 1)] == [nn.Linear]
    assert len(projection_head(8, 16, 4, 0)) == 0  # no head: identity
    headless = build_model("vit_tiny_patch16_224", img_size=32, model_kwargs=TINY_VIT, head_layers=0)
    assert headless(torch.randn(2, 3, 32, 32)).shape == (2, 32)


def _decay_split(model, **kwargs) -> tuple[set[str], set[str]]:
    decay, no_decay = model.param_groups(0.1, **kwargs)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names, no_decay_names = ({names[id(p)] for p in g["params"]} for g in (decay, no_decay))
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    torch.optim.AdamW(model.param_groups(0.1, **kwargs), lr=1e-3)  # accepted as-is
    return decay_names, no_decay_names


def test_param_groups_decay_every_matrix_but_biases_and_norms():
    """Official (util/misc.py add_weight_decay): decay iff ndim >= 2 and not a bias / norm, so the class
    token, both position embeddings and the token embedding are decayed."""
    model = tiny(text=TINY_TEXT)
    decay_names, no_decay_names = _decay_split(model)
    text_position = [n for n in decay_names if n.endswith("embeddings.position_embedding.weight")]
    text_tokens = [n for n in decay_names if n.endswith("embeddings.token_embedding.weight")]
    assert len(text_position) == 1 and text_position[0].startswith("text.") and len(text_tokens) == 1
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
            "backbone.blocks.0.attn.qkv.weight", "head.0.weight", "head.6.weight", "image_projection.weight"} <= decay_names
    assert {"logit_scale", "backbone.blocks.0.norm1.weight", "head.1.weight", "head.0.bias"} <= no_decay_names
    params = dict(model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay_names)
    assert all(params[n].ndim < 2 for n in no_decay_names)  # every bias and norm weight here is 1-D


def test_param_groups_without_embedding_decay():
    """--no-wd-embeddings: timm's no_weight_decay() names and the text positions are spared too."""
    model = tiny(text=TINY_TEXT)
    decay_names, no_decay_names = _decay_split(model, decay_embeddings=False)
    assert {"backbone.cls_token", "backbone.pos_embed", "logit_scale", "head.0.bias"} <= no_decay_names
    position = [n for n in no_decay_names if n.endswith("embeddings.position_embedding.weight")]
    assert len(position) == 1 and position[0].startswith("text.")
    assert {"backbone.patch_embed.proj.weight", "head.0.weight", "image_projection.weight"} <= decay_names


def test_export_and_load_backbone_round_trip(tmp_path):
    model = tiny().eval()
    weights = model.export_backbone(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "backbone.json").read_text())
    assert meta == {"model": "vit_tiny_patch16_224",
                    "model_kwargs": {"num_classes": 0, "img_size": 32, **TINY_VIT}, "num_features": 32,
                    "input_size": 32}
    # the documented recipe: timm.create_model + load_state_dict
    plain = timm.create_model(meta["model"], pretrained=False, **meta["model_kwargs"])
    plain.load_state_dict(load_file(str(weights)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.backbone(x)
        torch.testing.assert_close(plain.eval()(x), expected)
        for source in (tmp_path / "run", weights, tmp_path / "run" / "backbone.json"):
            loaded = load_backbone(source)
            assert not loaded.training
            torch.testing.assert_close(loaded(x), expected)


def test_cnn_backbone_takes_no_img_size_and_exports_its_input_size(tmp_path):
    from trainer.eval import load_eval_backbone

    kwargs = {"channels": [8, 16, 32, 64], "stem_width": 8}
    model = build_model("resnet10t", img_size=48, model_kwargs=kwargs, head_hidden=32, head_out=16).eval()
    assert "img_size" not in model.model_kwargs
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 16)
    model.export_backbone(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "backbone.json").read_text())["input_size"] == 48
    evaluated = load_eval_backbone(tmp_path / "run")
    assert evaluated.input_size == 48 and evaluated.num_features == 64
    with pytest.raises(ValueError, match="img_size"):  # a real img_size mistake is still reported
        build_model("resnet10t", img_size=48, model_kwargs={"img_size": 48})


def test_load_backbone_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.safetensors"):
        load_backbone(tmp_path)
    tiny().export_backbone(tmp_path)
    (tmp_path / "backbone.json").write_text("{\"model\": 3}")
    with pytest.raises(ValueError, match="backbone.json"):
        load_backbone(tmp_path)


def test_sync_bn_conversion():
    model = tiny(sync_bn=True)
    assert isinstance(model.head[1], nn.SyncBatchNorm)
    assert not any(type(m) is nn.BatchNorm1d for m in model.modules())


def test_unknown_timm_model_is_refused():
    with pytest.raises((ValueError, RuntimeError), match="no_such_vit"):
        build_model("no_such_vit")


def test_model_with_text_tower():
    model = tiny(text=TINY_TEXT)
    x = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a red cube", "a blue ball"])
    out = model(x, tokens)
    assert out["ssl"].shape == (3, 24) and out["image_embed"].shape == (3, 16)
    assert out["text_embed"].shape == (2, 16)
    assert out["logit_scale"].item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
    assert "ssl" not in model(x, tokens, ssl=False)
    torch.testing.assert_close(model.encode_text(tokens), out["text_embed"])
    model.eval()
    torch.testing.assert_close(model.encode_image(x), model(x, tokens)["image_embed"])
    with pytest.raises(RuntimeError, match="no text tower"):
        tiny().encode_text(tokens)


def test_byte_tokenizer_truncates_and_keeps_eos():
    tok = ByteTokenizer(context_length=8)
    ids = tok(["ab", "é" * 10])
    assert ids.shape == (2, 8)
    assert ids[0].tolist() == [257, 97, 98, 258, 256, 256, 256, 256]
    assert ids[1, 0] == 257 and ids[1, -1] == 258 and (ids[1, 1:-1] < 256).all()
    assert eot_positions(ids, tok.eos_id, tok.pad_id).tolist() == [3, 7]


def test_text_tower_is_causal_and_pools_eot():
    torch.manual_seed(0)
    tower = TextTower(TINY_TEXT)
    tokens = tower.tokenize(["red cube", "blue"])
    base = tower(tokens)
    after_eot = tokens.clone()
    after_eot[1, 8] = 65  # a token after EOS of row 1 cannot change its embedding
    torch.testing.assert_close(tower(after_eot)[1], base[1])
    before_eot = tokens.clone()
    before_eot[1, 2] = 65
    assert not torch.allclose(tower(before_eot)[1], base[1])
    with pytest.raises(ValueError, match="tokens"):
        tower(torch.zeros(2, 40, dtype=torch.long))


def _save_word_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4, "red": 5, "cube": 6, "blue": 7}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def test_local_hugging_face_tokenizer(tmp_path):
    _save_word_tokenizer(tmp_path / "tok")
    tok = HFTokenizer(tmp_path / "tok", context_length=6)
    ids = tok(["a red cube", "blue"])
    assert ids.shape == (2, 6) and ids[0, :3].tolist() == [4, 5, 6] and ids[1, 1] == 0
    assert eot_positions(ids, tok.eos_id, tok.pad_id).tolist() == [2, 0]  # no EOS added: last real token
    tower = TextTower(TextConfig(width=16, layers=1, heads=2, context_length=6, embed_dim=8,
                                 tokenizer=str(tmp_path / "tok")))
    assert tower(tower.tokenize(["a red cube"])).shape == (1, 8)


def test_missing_tokenizer_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        TextTower(TextConfig(tokenizer=str(tmp_path / "nope")))
