"""Hugging Face BERT-family text towers (``bert``, ``roberta``, ``xlm-roberta``) as imagefm's
:class:`~imagefm.models.bert.BertEncoder`: config, key rules and tokenizer.

Shared by the two formats that carry such a tower: ``VisionTextDualEncoderModel`` directories
(:mod:`imagefm.convert.vision_text`) and open_clip models with an ``HFTextEncoder``
(:mod:`imagefm.convert.open_clip`). The towers differ only in their position ids (RoBERTa
counts from ``pad_token_id + 1`` over the non-pad tokens) and in how they are pooled, both
recorded in :class:`~imagefm.config.BertConfig`.

Tokenizers: ``transformers`` builds BERT / RoBERTa / XLM-R tokenizers from the tokenizer class
and ``tokenizer_config.json`` (``do_lower_case``, ``strip_accents``, the special tokens), taking
the vocabulary (and XLM-R's normaliser) from ``tokenizer.json``. :func:`bert_family_tokenizer`
follows the same rules, so ``input_ids`` and ``attention_mask`` equal transformers' (checked by
tests/test_parity_vision_text.py on English and Korean).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

from imagefm.checkpoint import CheckpointError
from imagefm.config import BertConfig, ConfigError, DualEncoderConfig
from imagefm.convert.keymap import Rule, rule

HF_TEXT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")

# transformers' defaults for fields a config.json may leave out (configuration_bert.py,
# configuration_roberta.py, configuration_xlm_roberta.py).
_COMMON_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
    position_embedding_type="absolute")
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "bert": {**_COMMON_DEFAULTS, "vocab_size": 30522, "pad_token_id": 0},
    "roberta": {**_COMMON_DEFAULTS, "vocab_size": 50265, "pad_token_id": 1},
    "xlm-roberta": {**_COMMON_DEFAULTS, "vocab_size": 30522, "pad_token_id": 1},
}
# BERT's hidden_act names -> ours (transformers' ACT2FN).
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu", "swish": "silu"}


def bert_config_from_hf_text(hf: dict[str, Any], where: str = "text_config", *, pool: str,
                             context_length: int | None = None,
                             padding_mask: str = "given") -> BertConfig:
    """Our :class:`BertConfig` from a ``bert`` / ``roberta`` / ``xlm-roberta`` config (a
    ``config.json`` or a ``text_config``). ``context_length`` defaults to the longest text the
    position table holds."""
    model_type = hf.get("model_type")
    if model_type not in _TEXT_DEFAULTS:
        raise CheckpointError(f"{where}: text model_type {model_type!r} is not supported; imagefm "
                              f"reads {', '.join(HF_TEXT_MODEL_TYPES)} text towers")
    c = {**_TEXT_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    if c["position_embedding_type"] != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type {c['position_embedding_type']!r}"
                              f" is not supported (absolute only)")
    if c.get("is_decoder") or c.get("add_cross_attention"):
        raise CheckpointError(f"{where}: a decoder / cross-attention text model is not a text "
                              f"encoder imagefm can load")
    if c["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act {c['hidden_act']!r} is not supported; "
                              f"imagefm knows {', '.join(sorted(_ACTIVATIONS))}")
    values = dict(vocab_size=c["vocab_size"], max_positions=c["max_position_embeddings"],
                  type_vocab_size=c["type_vocab_size"], width=c["hidden_size"],
                  layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                  mlp_dim=c["intermediate_size"], act=_ACTIVATIONS[c["hidden_act"]],
                  norm_eps=float(c["layer_norm_eps"]), pad_token_id=int(c["pad_token_id"]),
                  positions="arange" if model_type == "bert" else "roberta",
                  pool=pool, padding_mask=padding_mask)
    try:
        longest = BertConfig(**{**values, "context_length": 1}).max_text_length
        return BertConfig(**values, context_length=min(context_length or longest, longest))
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{where}: cannot express this text model in imagefm: "
                              f"{err}") from None


def hf_text_rules(source: str, ours: str = "text.", *, pooler: bool) -> list[Rule]:
    """Rules from a ``BertModel``/``RobertaModel``/``XLMRobertaModel`` under the ``source``
    prefix (``text_model.``) to our BertEncoder under ``ours`` (``text.``); with the pooler's
    dense layer when the tower pools with it."""
    from imagefm.convert.towers import bert_key_map

    rules = [rule(r.source, [ours + name for name in r.ours], r.transform)
             for r in bert_key_map(source).rules]
    if pooler:
        rules += [rule(f"{source}pooler.dense.{p}", f"{ours}pooler.{p}")
                  for p in ("weight", "bias")]
    return rules


def hf_text_ignore(source: str, *, pooler: bool) -> tuple[str, ...]:
    """Keys that carry no weights of ours: the ``position_ids`` / ``token_type_ids`` buffers
    older checkpoints saved, and the pooler of a tower that does not pool with it."""
    ignore = (f"{source}embeddings.position_ids", f"{source}embeddings.token_type_ids")
    if not pooler:
        ignore += (f"{source}pooler.dense.weight", f"{source}pooler.dense.bias")
    return ignore


# --- tokenizer -----------------------------------------------------------------------------------

# tokenizer_class -> the family whose rules transformers applies; a missing class comes from the
# model_type, as AutoTokenizer does.
_TOKENIZER_FAMILIES = {"BertTokenizer": "bert", "RobertaTokenizer": "roberta",
                       "XLMRobertaTokenizer": "xlm-roberta"}
# [CLS] text [SEP] for BERT; <s> text </s> for RoBERTa and XLM-R. Padding with the pad token.
_SPECIAL_DEFAULTS = {"bert": ("[CLS]", "[SEP]", "[PAD]"), "roberta": ("<s>", "</s>", "<pad>"),
                     "xlm-roberta": ("<s>", "</s>", "<pad>")}
TOKENIZER_JSON = "tokenizer.json"


def _read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (
        TOKENIZER_JSON, "tokenizer_config.json", "vocab.txt", "sentencepiece.bpe.model",
        "vocab.json"))


def bert_family_tokenizer(directory: str | Path, *, model_type: str | None = None,
                          context_length: int | None = None, padding: str = "longest") -> Any:
    """An imagefm :class:`~imagefm.tokenizer.Tokenizer` for the BERT / RoBERTa / XLM-R tokenizer
    in ``directory`` (``tokenizer.json`` + ``tokenizer_config.json``): ``[CLS] text [SEP]`` or
    ``<s> text </s>``, padded with the pad token, truncated to ``context_length`` (default: the
    tokenizer's ``model_max_length``). ``model_type`` names the family when the directory has no
    ``tokenizer_class``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers

    from imagefm.tokenizer import Tokenizer

    directory = Path(directory)
    config = _read_json_if_present(directory / "tokenizer_config.json")
    config.update(_read_json_if_present(directory / "special_tokens_map.json"))
    name = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    family = _TOKENIZER_FAMILIES.get(name) if name else (
        model_type or _read_json_if_present(directory / "config.json").get("model_type"))
    if family not in _SPECIAL_DEFAULTS:
        raise CheckpointError(f"{directory}: tokenizer {name or family!r} is not a BERT-family "
                              f"tokenizer imagefm reads ({', '.join(_TOKENIZER_FAMILIES)})")
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory}: {TOKENIZER_JSON} not found; imagefm reads the fast "
                              f"tokenizer file (write one with transformers: AutoTokenizer."
                              f"from_pretrained(...).save_pretrained(...))")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception type
        raise CheckpointError(f"{path} cannot be read: {err}") from None
    if family == "bert":
        # transformers rebuilds BERT's normaliser from tokenizer_config.json (do_lower_case wins
        # over what tokenizer.json says); the lower-casing stays in the backend, after our NFC.
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            strip_accents=config.get("strip_accents"),
            lowercase=bool(config.get("do_lower_case", True)))
    cls_default, sep_default, pad_default = _SPECIAL_DEFAULTS[family]
    ids = {}
    for key, default in (("cls_token", cls_default), ("sep_token", sep_default),
                         ("pad_token", pad_default)):
        token = _token(config.get(key)) or default
        ids[key] = backend.token_to_id(token)
        if ids[key] is None:
            raise CheckpointError(f"{directory}: the {key} {token!r} is not in {TOKENIZER_JSON}")
    if context_length is None:
        length = config.get("model_max_length")
        # transformers writes a huge sentinel when no length was set.
        context_length = length if isinstance(length, int) and length < 100_000 else 512
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / TOKENIZER_JSON
        backend.save(str(file))
        return Tokenizer.from_file(file, context_length=context_length, padding=padding,
                                   pad_id=ids["pad_token"], bos_id=ids["cls_token"],
                                   eos_id=ids["sep_token"])


# --- open_clip's HFTextEncoder -------------------------------------------------------------------
# open_clip (hf_model.py) wraps AutoModel(config): the attention mask is always
# ``input_ids != pad_token_id`` (whatever mask the caller has), then a pooler and a projection.

OPEN_CLIP_POOLERS = {"mean_pooler": "mean", "cls_pooler": "pooler",
                     "cls_last_hidden_state_pooler": "first"}
OPEN_CLIP_PROJECTIONS = {"mlp": "mlp", "linear": "linear", None: "none"}
OPEN_CLIP_CONTEXT_LENGTH = 77  # open_clip's DEFAULT_CONTEXT_LENGTH for HF tokenizers


def _local_dir(name: Any) -> Path | None:
    return Path(name) if isinstance(name, str) and name and Path(name).is_dir() else None


def open_clip_hf_text_config(text_cfg: dict[str, Any], hf_text: str | Path | None = None,
                             where: str = "open_clip_config.json") -> dict[str, Any]:
    """The Hugging Face ``config.json`` of an open_clip model's text tower.

    open_clip reads it with ``AutoConfig.from_pretrained(text_cfg.hf_model_name)`` (a Hub id or
    a local directory). imagefm downloads nothing here: ``hf_text`` (a directory holding that
    model's config.json, e.g. one the hub layer fetched) comes first, then ``hf_model_name``
    when it is a local directory; otherwise the load is refused naming the missing file.
    """
    name = text_cfg.get("hf_model_name")
    for directory in (Path(hf_text) if hf_text is not None else None, _local_dir(name)):
        if directory is not None:
            path = directory / "config.json" if directory.is_dir() else directory
            if not path.is_file():
                raise CheckpointError(f"{path} not found: expected the config.json of the "
                                      f"Hugging Face text model {name!r}")
            data = _read_json_if_present(path)
            if not data:
                raise CheckpointError(f"{path} does not hold a JSON object")
            return data
    raise CheckpointError(
        f"{where}: text_cfg.hf_model_name = {name!r} is a Hugging Face text model whose "
        f"config.json imagefm needs (open_clip downloads it with AutoConfig); pass "
        f"hf_text=<a directory holding {name}'s config.json (and tokenizer files)>")


def open_clip_hf_text(text_cfg: dict[str, Any], hf: dict[str, Any], embed_dim: int,
                      where: str = "open_clip_config.json") -> tuple[BertConfig, str]:
    """(text tower config, text projection kind) of an open_clip ``HFTextEncoder``."""
    pooler = text_cfg.get("hf_pooler_type", "mean_pooler")  # CLIPTextCfg's defaults
    proj = text_cfg.get("hf_proj_type", "mlp")
    if pooler not in OPEN_CLIP_POOLERS:
        raise CheckpointError(f"{where}: text_cfg.hf_pooler_type = {pooler!r} is not supported "
                              f"({', '.join(OPEN_CLIP_POOLERS)})")
    if proj not in OPEN_CLIP_PROJECTIONS:
        raise CheckpointError(f"{where}: text_cfg.hf_proj_type = {proj!r} is not supported "
                              f"(mlp, linear or null)")
    length = text_cfg.get("context_length") or OPEN_CLIP_CONTEXT_LENGTH
    text = bert_config_from_hf_text(hf, f"{where}: {text_cfg.get('hf_model_name')}",
                                    pool=OPEN_CLIP_POOLERS[pooler], context_length=length,
                                    padding_mask="pad_id")
    if proj is None and text.width != embed_dim:
        raise CheckpointError(f"{where}: text_cfg.hf_proj_type = null with a text width of "
                              f"{text.width} != embed_dim {embed_dim}: open_clip builds no "
                              f"projection for it")
    return text, OPEN_CLIP_PROJECTIONS[proj]


def open_clip_hf_text_rules(config: DualEncoderConfig) -> tuple[list[Rule], tuple[str, ...]]:
    """(rules, ignored keys) of an ``HFTextEncoder`` (``text.transformer.*``, ``text.proj``)."""
    pooler = config.text.pool == "pooler"
    rules = hf_text_rules("text.transformer.", pooler=pooler)
    if config.text_projection == "mlp":  # nn.Sequential(Linear, GELU, Linear)
        rules += [rule("text.proj.0.weight", "text_proj.fc1.weight"),
                  rule("text.proj.2.weight", "text_proj.fc2.weight")]
    elif config.text_projection == "linear":
        rules.append(rule("text.proj.weight", "text_proj.weight"))
    return rules, hf_text_ignore("text.transformer.", pooler=pooler)


def open_clip_hf_text_tokenizer(directory: Path | None, text_cfg: dict[str, Any],
                                context_length: int, hf_text: str | Path | None = None,
                                model_type: str | None = None) -> Any:
    """The tokenizer open_clip's ``HFTokenizer`` builds for an HF text tower: the tokenizer's own
    rules, padded to ``context_length`` (77) with its pad token. Its files are looked for in the
    checkpoint directory, then ``hf_text``, then ``hf_tokenizer_name`` as a local directory;
    None (with a warning) when there are none or open_clip's options differ from these rules."""
    name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    places = [directory, Path(hf_text) if hf_text is not None else None, _local_dir(name)]
    found = next((d for d in places if d is not None and d.is_dir()
                  and (d / TOKENIZER_JSON).is_file()), None)
    problem = None
    if found is None:
        problem = (f"no {TOKENIZER_JSON} of the Hugging Face tokenizer {name!r} found (looked in "
                   f"{', '.join(str(d) for d in places if d is not None) or 'nowhere'})")
    elif text_cfg.get("tokenizer_mode") or text_cfg.get("tokenizer_kwargs"):
        problem = "open_clip's tokenizer_mode / tokenizer_kwargs are not supported here"
    if problem is None:
        try:
            return bert_family_tokenizer(found, model_type=model_type, padding="max_length",
                                         context_length=context_length)
        except (CheckpointError, OSError, ValueError) as err:
            problem = str(err)
    warnings.warn(f"loading the open_clip model without a tokenizer: {problem}", stacklevel=4)
    return None
