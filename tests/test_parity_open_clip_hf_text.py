"""Parity with open_clip models whose text tower is a Hugging Face BERT / RoBERTa / XLM-RoBERTa
(open_clip's HFTextEncoder, as in ``xlm-roberta-base-ViT-B-32``): tiny random CustomTextCLIP
models built here offline (``hf_model_name`` is a local directory holding a tiny config.json and
a tokenizer trained here), saved as hub-style directories, loaded with imagefm."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

from hf_text_fixtures import TEXTS, perturb, text_config, tokenizer_dir  # noqa: E402

import imagefm  # noqa: E402
import imagefm.convert.open_clip as oc  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.open_clip import load_open_clip, load_open_clip_processor  # noqa: E402
from imagefm.convert.open_clip_export import export_open_clip  # noqa: E402

TOL = 1e-5
SIZE, CONTEXT = 30, 16


def _text_dir(directory: Path, text_type: str) -> Path:
    """What ``hf_model_name`` names: the text model's config.json and its tokenizer."""
    tokenizer_dir(directory, text_type)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    text_config(text_type, len(tokenizer), tokenizer.pad_token_id).save_pretrained(directory)
    return directory


def _model_cfg(text_dir: Path | str, pooler: str, proj: str | None, embed_dim: int = 11) -> dict:
    return {"embed_dim": embed_dim, "quick_gelu": True, "custom_text": True,
            "vision_cfg": {"image_size": SIZE, "patch_size": 6, "width": 24, "layers": 2,
                           "head_width": 12, "mlp_ratio": 2.0},
            "text_cfg": {"hf_model_name": str(text_dir), "hf_tokenizer_name": str(text_dir),
                         "hf_pooler_type": pooler, "hf_proj_type": proj,
                         "context_length": CONTEXT}}


def _reference(model_cfg: dict, directory: Path) -> torch.nn.Module:
    """open_clip's CustomTextCLIP (random text weights: hf_model_pretrained off), randomised,
    saved as a hub-style directory."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("custom_text")
    cfg["text_cfg"]["hf_model_pretrained"] = False
    model = open_clip.CustomTextCLIP(**cfg).eval()
    perturb(model)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    return model


def _open_clip_ids(tokenizer_dir: Path) -> torch.Tensor:
    """open_clip's HFTokenizer for hf_tokenizer_name (what get_tokenizer builds for built-in and
    hf-hub: names): the tokenizer's own rules, padded to context_length."""
    return open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=CONTEXT)(TEXTS)


def _assert_parity(ours, reference, ids: torch.Tensor) -> None:
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        image = reference.encode_image(pixels, normalize=True)
        text = reference.encode_text(ids, normalize=True)
        logits, _ = reference.get_logits(pixels, ids)
        # open_clip masks the pad id whatever the caller's mask: none, or a wrong one, is the same
        for mask in ((ids != ours.config.text.pad_token_id).long(), None, torch.ones_like(ids)):
            out = ours(pixels, ids, mask)
            for name, a, b in (("image", out.image_embeds, image), ("text", out.text_embeds, text),
                               ("logits", out.logits_per_image, logits)):
                diff = (a - b).abs().max().item()
                assert diff <= TOL, f"{name}: max abs diff {diff:.3g}"


CASES = {  # text tower, open_clip pooler, projection, embed_dim
    "xlm-roberta-mean-mlp": ("xlm-roberta", "mean_pooler", "mlp", 11),  # xlm-roberta-base-ViT-B-32
    "roberta-cls-linear": ("roberta", "cls_pooler", "linear", 11),  # BERT's pooler, Linear
    "bert-cls-hidden-none": ("bert", "cls_last_hidden_state_pooler", None, 20),  # no projection
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_text_tower_parity(tmp_path: Path, case: str) -> None:
    text_type, pooler, proj, embed_dim = CASES[case]
    text_dir = _text_dir(tmp_path / "text", text_type)
    model_cfg = _model_cfg(text_dir, pooler, proj, embed_dim)
    directory = tmp_path / "open_clip"
    reference = _reference(model_cfg, directory)

    model = imagefm.load(directory)
    expected_pool = {"mean_pooler": "mean", "cls_pooler": "pooler",
                     "cls_last_hidden_state_pooler": "first"}[pooler]
    assert model.config.text.pool == expected_pool
    assert model.config.text_projection == {"mlp": "mlp", "linear": "linear", None: "none"}[proj]

    ids = _open_clip_ids(text_dir)
    ours = model.tokenizer(TEXTS)
    assert ids.shape == (len(TEXTS), CONTEXT)
    assert torch.equal(ours["input_ids"], ids)
    _assert_parity(model, reference, ids)


def test_text_config_from_hf_text_when_the_name_is_a_hub_id(tmp_path: Path) -> None:
    """Real open_clip configs name a Hub model; imagefm.load fetches its config.json (here the
    suite runs offline with nothing cached: refused, saying how to fill the cache), the converter
    alone refuses saying what to pass, and ``hf_text`` supplies it."""
    text_dir = _text_dir(tmp_path / "text", "xlm-roberta")
    reference = _reference(_model_cfg(text_dir, "mean_pooler", "mlp"), tmp_path / "ref")
    hub_cfg = _model_cfg("xlm-roberta-base", "mean_pooler", "mlp")
    hub_cfg["text_cfg"]["hf_tokenizer_name"] = "xlm-roberta-base"
    directory = tmp_path / "hub"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": hub_cfg}))
    (directory / "open_clip_model.safetensors").symlink_to(
        tmp_path / "ref" / "open_clip_model.safetensors")

    with pytest.raises(CheckpointError, match=r"xlm-roberta-base.*not in the Hub cache.*download"):
        imagefm.load(directory)
    with pytest.raises(CheckpointError, match=r"'xlm-roberta-base'.*config\.json.*hf_text="):
        load_open_clip(directory)
    model = load_open_clip(directory, hf_text=text_dir)
    ids = _open_clip_ids(text_dir)
    assert torch.equal(model.tokenizer(TEXTS)["input_ids"], ids)  # found through hf_text
    _assert_parity(model, reference, ids)
    processor = load_open_clip_processor(directory, hf_text=text_dir)
    assert torch.equal(processor(texts=TEXTS)["input_ids"], ids)


def test_real_architecture_config(tmp_path: Path) -> None:
    """open_clip's own xlm-roberta-base-ViT-B-32.json, with a (tiny) xlm-roberta config.json."""
    text_dir = _text_dir(tmp_path / "text", "xlm-roberta")
    hf = json.loads((text_dir / "config.json").read_text())
    config = oc.config_from_open_clip(oc.arch_config("xlm-roberta-base-ViT-B-32"), hf)
    assert (config.text.pool, config.text.positions, config.text.padding_mask) == (
        "mean", "roberta", "pad_id")
    assert config.text_projection == "mlp" and config.vision.width == 768
    # context_length: open_clip's 77, capped by the position table (34 - pad 1 - 1)
    assert config.text.context_length == 32
    with pytest.raises(CheckpointError, match="config.json"):
        oc.config_from_open_clip(oc.arch_config("roberta-ViT-B-32"))


def test_save_reload_and_refusals(tmp_path: Path) -> None:
    text_dir = _text_dir(tmp_path / "text", "xlm-roberta")
    model_cfg = _model_cfg(text_dir, "mean_pooler", "mlp")
    reference = _reference(model_cfg, tmp_path / "open_clip")
    model = imagefm.load(tmp_path / "open_clip")
    model.save_pretrained(tmp_path / "ours")
    reloaded = imagefm.load(tmp_path / "ours")
    ids = _open_clip_ids(text_dir)
    assert torch.equal(reloaded.tokenizer(TEXTS)["input_ids"], ids)
    _assert_parity(reloaded, reference, ids)

    with pytest.raises(CheckpointError, match="BERT-family"):
        export_open_clip(model, tmp_path / "export")
    hf = json.loads((text_dir / "config.json").read_text())
    for field, value, message in (("hf_pooler_type", "max_pooler", "max_pooler"),
                                  ("hf_proj_type", None, "no projection"),
                                  ("made_up", 1, "made_up")):
        cfg = copy.deepcopy(model_cfg)
        cfg["text_cfg"][field] = value
        with pytest.raises(CheckpointError, match=message):
            oc.config_from_open_clip(cfg, hf)


def test_text_tower_config_comes_from_the_hub(hub, tmp_path: Path) -> None:
    """As open_clip does (AutoConfig.from_pretrained(hf_model_name)), the text model's config
    and tokenizer come from the Hub (our server on 127.0.0.1) or its cache; offline after."""
    text_dir = _text_dir(tmp_path / "text", "xlm-roberta")
    directory = tmp_path / "open_clip"
    reference = _reference(_model_cfg(text_dir, "mean_pooler", "mlp"), directory)
    config = json.loads((directory / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"].update(hf_model_name="FacebookAI/xlm-roberta-base",
                                           hf_tokenizer_name="FacebookAI/xlm-roberta-base")
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    hub.add_repo("FacebookAI/xlm-roberta-base", text_dir)
    hub.add_repo("laion/tiny-xlm-roberta-clip", directory)
    model = imagefm.load("hf-hub:laion/tiny-xlm-roberta-clip")
    _assert_parity(model, reference, _open_clip_ids(text_dir))
    assert "config.json" in hub.downloaded("FacebookAI/xlm-roberta-base")
    with hub.offline():
        _, proc = imagefm.load("hf-hub:laion/tiny-xlm-roberta-clip", processor=True)
    assert torch.equal(proc.tokenizer(TEXTS)["input_ids"], _open_clip_ids(text_dir))
