"""Parity with open_clip for models whose image tower is a timm SigLIP ViT (``ViT-B-16-SigLIP``,
``ViT-SO400M-14-SigLIP``, ``hf-hub:timm/...``): tiny random open_clip models with odd shapes, built
here around tiny timm ViTs registered under test names, saved as open_clip's ``save_for_hf``
writes an hf-hub repo (config + weights + T5-style tokenizer) or as a bare state dict."""

from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from open_clip.push_to_hf_hub import save_for_hf  # noqa: E402
from open_clip.tokenizer import HFTokenizer  # noqa: E402
from timm.models import register_model  # noqa: E402
from timm.models.vision_transformer import _create_vision_transformer  # noqa: E402

import imagefm  # noqa: E402
import imagefm.convert.open_clip as oc  # noqa: E402
import imagefm.convert.open_clip_timm as oct  # noqa: E402
from imagefm.convert.keymap import KeyMapError  # noqa: E402
from imagefm.convert.open_clip import (  # noqa: E402
    UnsupportedOpenClipConfig,
    load_open_clip,
    load_open_clip_processor,
)

TOL = 1e-5
SIZE, CONTEXT, VOCAB = 40, 12, 58  # the tokenizer has 2 more ids (T5's extra ids), as 32100/32000
TEXTS = ["A photo of a CAT!", "two dogs, on the beach; at night.",
         "a small red bird sits on a tree with a man and a woman in the park at night"]

# Tiny timm ViTs under test names, built the way timm builds its SigLIPs (timm 1.0 registry).
# Odd shapes: 3 heads of 16, MLP int(48 * 3.7362) = 179 (so400m's ratio), and patch 7 on a 40
# pixel image (grid 5, remainder dropped, as so400m/14 at 384).
TINY_TIMM = {
    "vit_imagefm_test_siglip_40": dict(img_size=SIZE, patch_size=8, embed_dim=48, depth=2,
                                       num_heads=3, mlp_ratio=3.7362),
    "vit_imagefm_test_siglip_tanh_40": dict(img_size=SIZE, patch_size=7, embed_dim=48, depth=2,
                                            num_heads=3, mlp_ratio=3.7362,
                                            act_layer="gelu_tanh"),
}


def _register(name: str, args: dict) -> None:
    def build(pretrained: bool = False, **kwargs):
        model_args = dict(args, class_token=False, global_pool="map")
        return _create_vision_transformer(name, pretrained=pretrained, **dict(model_args, **kwargs))

    build.__name__ = name
    if name not in timm.list_models(name):
        register_model(build)


for _name, _args in TINY_TIMM.items():
    _register(_name, _args)


@pytest.fixture(autouse=True)
def tiny_timm_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tell the converter the shapes of the test towers (as TIMM_VITS does for timm's own)."""
    for name, a in TINY_TIMM.items():
        monkeypatch.setitem(oct.TIMM_VITS, name, oct.TimmViT(
            image_size=a["img_size"], patch_size=a["patch_size"], width=a["embed_dim"],
            layers=a["depth"], heads=a["num_heads"],
            mlp_dim=int(a["embed_dim"] * a["mlp_ratio"]), act=a.get("act_layer", "gelu")))


def _model_cfg(timm_name: str = "vit_imagefm_test_siglip_40", proj: str = "none",
               **vision) -> dict:
    """An open_clip SigLIP config (as ViT-B-16-SigLIP.json) scaled down."""
    return {
        "embed_dim": 48 if proj == "none" else 40, "init_logit_bias": -10.0, "custom_text": True,
        "vision_cfg": {"image_size": SIZE, "timm_model_name": timm_name,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": proj,
                       **vision},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB,
                     "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 36, "heads": 3,
                     "layers": 2, "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True,
                     "pool_type": "last", "norm_kwargs": {"eps": 1e-6}},
    }


def _reference(model_cfg: dict) -> torch.nn.Module:
    """open_clip's own model for a config, every parameter randomised, SigLIP preprocessing."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text")
    model = open_clip.CustomTextCLIP(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.logit_scale.fill_(2.0)
    open_clip.model.set_model_preprocess_cfg(model, {
        "size": SIZE, "mode": "RGB", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic", "resize_mode": "squash", "fill_color": 0})
    return model


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A T5-style tokenizer as timm/ViT-B-16-SigLIP carries: a sentencepiece unigram model,
    saved by transformers (tokenizer.json + tokenizer_config.json) next to spiece.model."""
    words = ("a the photo of cat cats dog dogs bird red small man woman rides horse bowl fruit "
             "table park play sits on in with two three street car tree sky water beach night "
             "day snow and").split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=VOCAB,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i))
             for i in range(processor.get_piece_size())]
    directory = tmp_path_factory.mktemp("t5_tokenizer")
    transformers.T5Tokenizer(vocab=vocab, extra_ids=2).save_pretrained(directory)
    (directory / "spiece.model").write_bytes(buffer.getvalue())
    return directory


def _hub_dir(reference, model_cfg: dict, tokenizer_dir: Path, directory: Path,
             safe_serialization: bool | str = "both") -> Path:
    """An hf-hub repo exactly as open_clip's ``save_for_hf`` (push_to_hf_hub) writes it."""
    tokenizer = HFTokenizer(str(tokenizer_dir), context_length=CONTEXT, clean="canonicalize")
    save_for_hf(reference, tokenizer, model_cfg, directory, safe_serialization=safe_serialization)
    return directory


def _reference_ids(texts: list[str], directory: Path | None = None,
                   tokenizer_dir: Path | None = None) -> torch.Tensor:
    if directory is not None:  # open_clip's own reading of the repo
        return open_clip.get_tokenizer(f"local-dir:{directory}")(texts)
    return HFTokenizer(str(tokenizer_dir), context_length=CONTEXT, clean="canonicalize")(texts)


def _assert_parity(ours, reference, ids: torch.Tensor) -> None:
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ours(pixels, ids, (ids != 0).long())
        image = reference.encode_image(pixels, normalize=True)
        text = reference.encode_text(ids, normalize=True)
        logits, _ = reference.get_logits(pixels, ids)
    for name, a, b in (("image", out.image_embeds, image), ("text", out.text_embeds, text),
                       ("logits", out.logits_per_image, logits)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g}"


CASES = {
    # ViT-B-16-SigLIP / SO400M: attention pool, no projection (image embedding = pooled output)
    "map_none": dict(),
    # tanh-GELU tower, patch 7 (remainder dropped), open_clip's Linear head with bias
    "tanh_linear_proj": dict(timm_name="vit_imagefm_test_siglip_tanh_40", proj="linear",
                             timm_proj_bias=True),
    # timm_proj "": timm's own classifier projects to embed_dim
    "timm_head": dict(proj=""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hub_directory_parity(tmp_path: Path, t5_tokenizer_dir: Path, case: str) -> None:
    model_cfg = _model_cfg(**CASES[case])
    directory = _hub_dir(_reference(model_cfg), model_cfg, t5_tokenizer_dir, tmp_path / "repo")
    assert {"open_clip_config.json", "open_clip_model.safetensors",
            "open_clip_pytorch_model.bin", "tokenizer.json"} <= {p.name for p in
                                                                 directory.iterdir()}
    # What open_clip itself reads back from the repo is the reference.
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    model = load_open_clip(directory)
    assert model.config.model_type == "siglip" and model.config.vision.pool == "map"
    ids = _reference_ids(TEXTS, directory)
    assert torch.equal(model.tokenizer(TEXTS)["input_ids"], ids)
    _assert_parity(model, reference.eval(), ids)


def test_loads_through_imagefm_load(tmp_path: Path, t5_tokenizer_dir: Path) -> None:
    model_cfg = _model_cfg()
    reference = _reference(model_cfg)
    directory = _hub_dir(reference, model_cfg, t5_tokenizer_dir, tmp_path / "repo")
    model = imagefm.load(directory)
    _assert_parity(model, reference, _reference_ids(TEXTS, directory))


def test_bfloat16_load_matches_open_clip_in_bfloat16(tmp_path: Path,
                                                      t5_tokenizer_dir: Path) -> None:
    model_cfg = _model_cfg()
    reference = _reference(model_cfg)
    directory = _hub_dir(reference, model_cfg, t5_tokenizer_dir, tmp_path / "repo")
    model = imagefm.load(directory, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = reference.to(torch.bfloat16)
    ids = _reference_ids(TEXTS, directory)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(pixels.bfloat16(), ids)
        image = reference.encode_image(pixels.bfloat16(), normalize=True)
        text = reference.encode_text(ids, normalize=True)
    # bf16 keeps ~3 significant digits; the two implementations round at different places.
    assert (out.image_embeds.float() - image.float()).abs().max().item() <= 2e-2
    assert (out.text_embeds.float() - text.float()).abs().max().item() <= 2e-2


def test_pickle_only_directory(tmp_path: Path, t5_tokenizer_dir: Path) -> None:
    """Older repos hold only open_clip_pytorch_model.bin (read with weights_only=True)."""
    model_cfg = _model_cfg()
    reference = _reference(model_cfg)
    directory = _hub_dir(reference, model_cfg, t5_tokenizer_dir, tmp_path / "repo",
                         safe_serialization=False)
    assert not (directory / "open_clip_model.safetensors").exists()
    _assert_parity(load_open_clip(directory), reference, _reference_ids(TEXTS, directory))


def test_bare_state_dict_with_arch_name_loads_without_tokenizer(
        tmp_path: Path, t5_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tmp_path / "model_configs"
    configs.mkdir()
    model_cfg = _model_cfg()
    (configs / "ViT-B-16-SigLIP.json").write_text(json.dumps(model_cfg))
    monkeypatch.setattr(oc, "model_configs_dir", lambda: configs)
    reference = _reference(model_cfg)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="'timm/ViT-B-16-SigLIP'.*without a tokenizer"):
        model = load_open_clip(path, arch="ViT-B-16-SigLIP")
    assert model.tokenizer is None
    _assert_parity(model, reference, _reference_ids(TEXTS, tokenizer_dir=t5_tokenizer_dir))


def test_processor_matches_open_clip_transforms(tmp_path: Path, t5_tokenizer_dir: Path,
                                                shared_data: Path) -> None:
    """SigLIP preprocessing (squash resize, bicubic, mean = std = 0.5) on a real photo of odd
    size, and the tokenizer, against open_clip's transforms and tokenizer for the same repo."""
    from PIL import Image

    photos = sorted((shared_data / "coco-mini" / "train2017").glob("*.jpg"))
    if not photos:
        pytest.skip("no coco-mini photos")
    image = Image.open(photos[0]).convert("RGB")
    image = image.crop((3, 5, 3 + 401, 5 + 263))  # odd width and height, not square
    model_cfg = _model_cfg()
    directory = _hub_dir(_reference(model_cfg), model_cfg, t5_tokenizer_dir, tmp_path / "repo")
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    processor = load_open_clip_processor(directory)
    card = processor.card
    assert (card.image_size, card.resize_mode, card.interpolation) == (SIZE, "squash", "bicubic")
    assert card.mean == card.std == (0.5, 0.5, 0.5)
    batch = processor(images=[image], texts=TEXTS)
    expected = preprocess(image)[None]
    assert batch["pixel_values"].shape == expected.shape
    assert (batch["pixel_values"] - expected).abs().max().item() <= 1e-6
    assert torch.equal(batch["input_ids"], _reference_ids(TEXTS, directory))


def test_imagefm_format_round_trip(tmp_path: Path, t5_tokenizer_dir: Path) -> None:
    model_cfg = _model_cfg(timm_name="vit_imagefm_test_siglip_tanh_40", proj="linear")
    reference = _reference(model_cfg)
    model = load_open_clip(_hub_dir(reference, model_cfg, t5_tokenizer_dir, tmp_path / "repo"))
    model.save_pretrained(tmp_path / "ours")
    reloaded = imagefm.load(tmp_path / "ours")
    assert reloaded.config == model.config and reloaded.card == model.card
    assert torch.equal(reloaded.tokenizer(TEXTS)["input_ids"], model.tokenizer(TEXTS)["input_ids"])
    _assert_parity(reloaded, reference, _reference_ids(TEXTS, tokenizer_dir=t5_tokenizer_dir))


def test_missing_attention_pool_fails_strictly(tmp_path: Path, t5_tokenizer_dir: Path) -> None:
    model_cfg = _model_cfg()
    directory = _hub_dir(_reference(model_cfg), model_cfg, t5_tokenizer_dir, tmp_path / "repo",
                         safe_serialization=True)
    weights = directory / "open_clip_model.safetensors"
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(weights)).items() if "attn_pool.kv" not in k}
    save_file(state, str(weights))
    with pytest.raises(KeyMapError, match=r"vision\.head\.attn\.k_proj\.weight"):
        load_open_clip(directory)


@pytest.mark.parametrize(("vision", "message"), [
    ({"timm_model_name": "convnext_base"}, "timm_model_name = 'convnext_base'"),
    ({"timm_pool": "avg"}, "timm_pool = 'avg'"),
    ({"timm_proj": "mlp"}, "timm_proj = 'mlp'"),
    ({"image_size": 48}, "image_size = 48"),
    ({"made_up": 1}, "made_up"),
])
def test_unsupported_timm_settings_are_named(vision: dict, message: str) -> None:
    cfg = _model_cfg()
    cfg["vision_cfg"].update(vision)
    with pytest.raises(UnsupportedOpenClipConfig, match=message):
        oc.config_from_open_clip(cfg)


def test_real_siglip_architectures_read_without_timm() -> None:
    """Every open_clip SigLIP architecture with a timm tower becomes our config."""
    names = [p.stem for p in oc.model_configs_dir().glob("*SigLIP*.json")
             if json.loads(p.read_text()).get("vision_cfg", {}).get("timm_model_name")]
    assert "ViT-B-16-SigLIP" in names and "ViT-SO400M-14-SigLIP" in names
    for name in names:
        config = oc.config_from_open_clip(oc.arch_config(name))
        assert config.vision.pool == "map" and config.image_projection == "none"
    so400m = oc.config_from_open_clip(oc.arch_config("ViT-SO400M-14-SigLIP")).vision
    assert (so400m.width, so400m.layers, so400m.heads, so400m.mlp_dim) == (1152, 27, 16, 4304)


def test_timm_table_matches_timm() -> None:
    """TIMM_VITS says what timm builds for each name (built on the meta device: no memory)."""
    for name, shape in oct.TIMM_VITS.items():
        if name in TINY_TIMM:
            continue
        model = timm.create_model(name, pretrained=False, device="meta")
        block = model.blocks[0]
        kind = type(block.mlp.act).__name__  # timm's GELU / GELUTanh, or torch's nn.GELU
        tanh = kind == "GELUTanh" or getattr(block.mlp.act, "approximate", "none") == "tanh"
        assert kind in ("GELU", "GELUTanh"), name
        act = "gelu_tanh" if tanh else "gelu"
        built = oct.TimmViT(
            image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
            width=model.embed_dim, layers=len(model.blocks), heads=block.attn.num_heads,
            mlp_dim=block.mlp.fc1.out_features, act=act, norm_eps=model.norm.eps,
            pool=model.global_pool)
        assert built == shape, name
        assert model.attn_pool.mlp.fc1.out_features == shape.mlp_dim, name
        assert model.cls_token is None and model.reg_token is None, name
        assert model.patch_embed.proj.bias is not None, name
        for module in (model.norm_pre, block.ls1, block.attn.q_norm, model.fc_norm):
            assert isinstance(module, torch.nn.Identity), name


@pytest.mark.parametrize("kind", ["template_eos", "template_bos_eos", "bert", "roberta",
                                  "sequence", "none"])
def test_special_tokens_read_from_post_processor(tmp_path: Path, kind: str) -> None:
    """The BOS/EOS read from tokenizer.json are what the tokenizers library adds to a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[CLS]": 3, "[SEP]": 4, "a": 5, "b": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    backend.post_processor = {
        "template_eos": template,
        "template_bos_eos": processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]),
        "bert": processors.BertProcessing(("[SEP]", 4), ("[CLS]", 3)),
        "roberta": processors.RobertaProcessing(("</s>", 2), ("<s>", 1)),
        "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False), template]),
        "none": None,
    }[kind]
    backend.save(str(tmp_path / "tokenizer.json"))
    with_specials = backend.encode("a b").ids
    bos, eos = oct._special_ids(tmp_path) or (None, None)
    assert [i for i in (bos,) if i is not None] + [5, 6] + [i for i in (eos,) if i is not None] \
        == with_specials
