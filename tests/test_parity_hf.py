"""Parity with Hugging Face CLIPModel / SiglipModel: tiny random reference models built here,
saved with save_pretrained, loaded with imagefm.load; and imagefm -> export_hf -> from_pretrained.

Every reference parameter is perturbed before saving (HF initialises LayerNorms to exactly 1/0,
which would hide a swapped norm), and the logit scale/bias get distinct values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.config import DualEncoderConfig, TextConfig, VisionConfig  # noqa: E402
from imagefm.convert.hf import export_hf, load_hf_processor  # noqa: E402
from imagefm.models.dual_encoder import DualEncoder  # noqa: E402

TOL = 1e-5
VOCAB = 100
LENGTH = 12
PATCH = 8
SIZE = 32  # native image size (4x4 patches); 48 exercises position interpolation


def _perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _tower(**kw) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                **kw)


def _clip_reference(tmp: Path, act: str, eos: int) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=_tower(vocab_size=VOCAB, max_position_embeddings=LENGTH, hidden_act=act,
                           eos_token_id=eos, bos_token_id=VOCAB - 2, pad_token_id=0),
        vision_config=_tower(image_size=SIZE, patch_size=PATCH, hidden_act=act),
        projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    _perturb(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(7.0))
    model.save_pretrained(tmp)
    return model


def _siglip_reference(tmp: Path, use_head: bool = True) -> transformers.SiglipModel:
    config = transformers.SiglipConfig(
        text_config=_tower(vocab_size=VOCAB, max_position_embeddings=LENGTH),
        vision_config=_tower(image_size=SIZE, patch_size=PATCH, vision_use_head=use_head))
    model = transformers.SiglipModel(config).eval()
    _perturb(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(9.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(tmp)
    return model


def _texts(eos: int, pad: int, bos: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids of different lengths, EOS after the text, and their attention mask."""
    gen = torch.Generator().manual_seed(1)
    ordinary = torch.tensor([i for i in range(1, VOCAB - 2) if i not in (eos, pad)])
    lengths = [LENGTH, 6, 3]
    ids = torch.full((len(lengths), LENGTH), pad)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        body = ordinary[torch.randint(len(ordinary), (n,), generator=gen)]
        if bos is not None:
            body[0] = bos
        body[-1] = eos
        ids[row, :n], mask[row, :n] = body, 1
    return ids, mask


def _pixels(size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.3g} > {TOL}"


def _features(output) -> torch.Tensor:
    """get_*_features return a tensor in transformers 4 and a model output in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _compare(ours: DualEncoder, theirs, pixels, ids, mask, interpolate: bool = False) -> None:
    """Ours called with ``mask``; HF with it where our text tower uses masks, else without one
    (SigLIP: trained, and run by HF's processor, with no mask; ours ignores a mask given)."""
    their_mask = mask if ours.config.text.use_padding_mask else None
    with torch.no_grad():
        ref = theirs(input_ids=ids, pixel_values=pixels, attention_mask=their_mask,
                     interpolate_pos_encoding=interpolate)
        out = ours(pixels, ids, mask)
    _close(out.image_embeds, ref.image_embeds)
    _close(out.text_embeds, ref.text_embeds)
    _close(out.logits_per_image, ref.logits_per_image)


# --- HF -> imagefm -------------------------------------------------------------------------------

@pytest.mark.parametrize(("act", "eos", "pool"), [("quick_gelu", 2, "argmax"),
                                                  ("gelu", 7, "eos")])
def test_clip_parity(tmp_path: Path, act: str, eos: int, pool: str) -> None:
    reference = _clip_reference(tmp_path, act, eos)
    model = imagefm.load(tmp_path)
    assert model.config.text.pool == pool and model.config.vision.act == act
    assert model.tokenizer is None  # no tokenizer files: still loads
    if eos == 2:
        # Legacy config: HF pools at the largest id, so the real EOS must be the largest id.
        ids, mask = _texts(eos=VOCAB - 1, pad=0, bos=VOCAB - 2)
    else:
        # eos_token_id pooling takes the FIRST eos; pad with the same id to prove it.
        ids, mask = _texts(eos=eos, pad=eos, bos=VOCAB - 2)
    _compare(model, reference, _pixels(), ids, mask)
    # A non-native size: HF interpolates when asked, we whenever the grid differs.
    _compare(model, reference, _pixels(48), ids, mask, interpolate=True)
    torch.testing.assert_close(model.logit_scale.exp(), torch.tensor(7.0))


def test_siglip_parity_with_head(tmp_path: Path) -> None:
    reference = _siglip_reference(tmp_path, use_head=True)
    model = imagefm.load(tmp_path)
    assert model.config.vision.pool == "map" and model.config.text.pool == "last"
    ids, mask = _texts(eos=1, pad=1)
    assert not model.config.text.use_padding_mask  # as trained and as HF's processor runs it
    _compare(model, reference, _pixels(), ids, mask)  # a mask given changes nothing
    _compare(model, reference, _pixels(), ids, None)
    _compare(model, reference, _pixels(48), ids, mask, interpolate=True)
    with torch.no_grad():  # HF with a mask computes something else: the test can tell
        masked = _features(reference.get_text_features(input_ids=ids, attention_mask=mask))
        assert (model.encode_text(ids, mask) - masked).abs().max() > 10 * TOL
    assert model.logit_bias.item() == pytest.approx(-3.0)


def test_siglip_without_head_matches_tokens_and_text(tmp_path: Path) -> None:
    """Without its head HF's SigLIP vision tower outputs only tokens (pooler_output is None).
    We match those tokens exactly, and pool their mean (what SiglipForImageClassification does)."""
    reference = _siglip_reference(tmp_path, use_head=False)
    model = imagefm.load(tmp_path)
    assert model.config.vision.pool == "mean" and model.vision.head is None
    ids, mask = _texts(eos=1, pad=1)
    for size in (SIZE, 48):
        pixels = _pixels(size)
        with torch.no_grad():
            tokens = reference.vision_model(pixels, interpolate_pos_encoding=True)
            _close(model.vision.forward_tokens(pixels), tokens.last_hidden_state)
            _close(model.encode_image(pixels), tokens.last_hidden_state.mean(dim=1))
    with torch.no_grad():
        _close(model.encode_text(ids, mask), _features(reference.get_text_features(ids)))
    # Exported back, HF again has no head, and the tokens still agree.
    with pytest.warns(UserWarning, match="no pooled image output"):
        export_hf(model, tmp_path / "out")
    exported = _load_exported(transformers.SiglipModel, tmp_path / "out")
    pixels = _pixels()
    with torch.no_grad():
        _close(model.vision.forward_tokens(pixels),
               exported.vision_model(pixels).last_hidden_state)


def test_processor_card_from_preprocessor_config(tmp_path: Path) -> None:
    _clip_reference(tmp_path, "gelu", 7)
    transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                    crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        tmp_path)
    card = load_hf_processor(tmp_path).card
    assert (card.image_size, card.resize_mode, card.interpolation) == (SIZE, "shortest", "bicubic")
    assert card.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))

    siglip = tmp_path / "siglip"
    _siglip_reference(siglip)
    transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=2,
                                      image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(
        siglip)
    card = imagefm.load_processor(siglip).card
    assert (card.image_size, card.resize_mode, card.interpolation) == (SIZE, "squash", "bilinear")
    assert card.std == (0.25, 0.25, 0.25)


def test_hf_config_with_legacy_dict_and_missing_fields(tmp_path: Path) -> None:
    """transformers fills absent fields with its defaults, and a legacy text_config_dict replaces
    text_config entirely."""
    _clip_reference(tmp_path, "quick_gelu", 7)
    config = json.loads((tmp_path / "config.json").read_text())
    legacy = {**config["text_config"], "eos_token_id": 2}
    del legacy["hidden_act"]  # default: quick_gelu
    config["text_config"]["hidden_act"] = "relu"  # ignored: text_config_dict wins
    config["text_config_dict"] = legacy
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = imagefm.load(tmp_path)
    assert model.config.text.act == "quick_gelu" and model.config.text.pool == "argmax"
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert reloaded.text_model.eos_token_id == 2
    ids, mask = _texts(eos=VOCAB - 1, pad=0)
    _compare(model, reloaded, _pixels(), ids, mask)


# --- imagefm -> HF -------------------------------------------------------------------------------

def _load_exported(cls, directory: Path):
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}  # missing, unexpected, mismatched, errors
    assert not problems, f"HF loaded the export with problems: {problems}"
    return model.eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_round_trip_through_export(tmp_path: Path, family: str) -> None:
    if family == "clip":
        original = _clip_reference(tmp_path / "ref", "quick_gelu", 2)
        ids, mask = _texts(eos=VOCAB - 1, pad=0)
        cls = transformers.CLIPModel
    else:
        original = _siglip_reference(tmp_path / "ref")
        ids, mask = _texts(eos=1, pad=1)
        cls = transformers.SiglipModel
    ours = imagefm.load(tmp_path / "ref")
    export_hf(ours, tmp_path / "out")
    exported = _load_exported(cls, tmp_path / "out")
    for reference in (original, exported):
        _compare(ours, reference, _pixels(), ids, mask)
    assert imagefm.load(tmp_path / "out").card == ours.card


def _fresh(kind: str) -> DualEncoder:
    vision = VisionConfig(image_size=SIZE, patch_size=PATCH, width=32, layers=2, heads=4,
                          mlp_dim=64, act="gelu")
    text = TextConfig(vocab_size=VOCAB, context_length=LENGTH, width=32, layers=2, heads=4,
                      mlp_dim=64, act="gelu")
    if kind == "clip":
        config = DualEncoderConfig("clip", vision, text, embed_dim=24)
    else:
        vision = dataclasses.replace(vision, act="gelu_tanh", norm_eps=1e-6, class_token=False,
                                     patch_bias=True, pre_norm=False, pool="map")
        text = dataclasses.replace(text, act="gelu_tanh", norm_eps=1e-6, causal=False,
                                   pool="last")
        config = DualEncoderConfig("siglip", vision, text, embed_dim=32, image_projection="none",
                                   text_projection="linear_bias", init_logit_bias=-10.0)
    model = DualEncoder(config).eval()
    _perturb(model)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fresh_model_exports_to_hf(tmp_path: Path, kind: str) -> None:
    ours = _fresh(kind)
    export_hf(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel" if kind == "clip" else "SiglipModel"]
    reference = _load_exported(transformers.AutoModel, tmp_path)
    ids, mask = _texts(eos=VOCAB - 1, pad=0)  # argmax pooling (CLIP), last token (SigLIP)
    _compare(ours, reference, _pixels(), ids, mask)
    _compare(ours, reference, _pixels(48), ids, mask, interpolate=True)


def test_export_keeps_tokenizer(tmp_path: Path) -> None:
    from imagefm.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_open_clip(LENGTH)
    except FileNotFoundError:
        pytest.skip("open_clip's vocabulary is not installed")
    ours = _fresh("clip")
    config = ours.config.replace(text=dataclasses.replace(ours.config.text, vocab_size=49408))
    ours = DualEncoder(config).eval()
    ours.tokenizer = tokenizer
    export_hf(ours, tmp_path)
    loaded = imagefm.load(tmp_path)
    texts = ["a photo of a cat", "고양이 사진"]
    assert torch.equal(loaded.tokenizer(texts)["input_ids"], tokenizer(texts)["input_ids"])
    assert imagefm.load_processor(tmp_path).tokenizer is not None


def test_export_refuses_what_hf_cannot_express(tmp_path: Path) -> None:
    ours = _fresh("clip")
    mean_pool = ours.config.replace(vision=dataclasses.replace(ours.config.vision, pool="mean"))
    with pytest.raises(CheckpointError, match="vision.pool = 'mean'"):
        export_hf(DualEncoder(mean_pool), tmp_path)
    bidirectional = ours.config.replace(text=dataclasses.replace(ours.config.text, causal=False))
    with pytest.raises(CheckpointError, match="text.causal"):
        export_hf(DualEncoder(bidirectional), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_unsupported_model_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(CheckpointError, match=r"model_type 'blip' is not one imagefm reads"):
        imagefm.load(tmp_path)


def test_sharded_and_pickle_weights(tmp_path: Path) -> None:
    reference = _clip_reference(tmp_path / "sharded", "gelu", 7)
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids, mask = _texts(eos=7, pad=0)
    _compare(imagefm.load(tmp_path / "sharded"), reference, _pixels(), ids, mask)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(reference.state_dict(), pickled / "pytorch_model.bin")  # tensors only
    _compare(imagefm.load(pickled), reference, _pixels(), ids, mask)


def test_hf_tokenizer_files_are_attached(tmp_path: Path) -> None:
    """An HF CLIP directory with the tokenizer transformers saved: the loaded model carries a
    tokenizer that gives HF's ids."""
    from imagefm.tokenizer import clip_vocab_from_bpe_gz

    try:
        oc_dir = Path(__import__("open_clip").__file__).parent
    except ImportError:
        pytest.skip("open_clip (which ships the CLIP vocabulary) is not installed")
    vocab, merges = clip_vocab_from_bpe_gz(oc_dir / "bpe_simple_vocab_16e6.txt.gz")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    hf_tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"),
                                              str(tmp_path / "merges.txt"),
                                              model_max_length=LENGTH)
    _clip_reference(tmp_path / "model", "gelu", 7)
    hf_tokenizer.save_pretrained(tmp_path / "model")
    model = imagefm.load(tmp_path / "model")
    texts = ["a photo of a cat", "Two dogs, playing!"]
    expected = hf_tokenizer(texts, padding="max_length", max_length=LENGTH,
                            return_tensors="pt")
    got = model.tokenizer(texts)
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
