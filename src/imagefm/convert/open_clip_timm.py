"""open_clip models whose image tower is a timm ViT (``ViT-B-16-SigLIP``, ``ViT-SO400M-14-SigLIP``
and their ``hf-hub:timm/...`` repos), and the Hugging Face tokenizers those models name.

open_clip describes such a tower only by name (``vision_cfg.timm_model_name``); its shape lives in
timm's model registry. ``TIMM_VITS`` holds those shapes as data for timm's SigLIP ViTs (checked
against timm itself by the tests), so loading needs neither timm nor open_clip. What open_clip
builds for ``timm_pool = "map"``::

    patch_embed.proj (conv, bias) + pos_embed -> blocks (pre-LN, fused qkv) -> norm
        -> attn_pool: latent query, q / kv projections, proj, x + mlp(norm(x)) -> [B, width]
        -> head.proj (timm_proj "linear") | trunk.head (timm_proj "") | nothing ("none")

which is our ViT with ``class_token=False, patch_bias=True, pre_norm=False, pool="map"``. The
model's image size and activation are timm's (SigLIP v1 towers use exact GELU, some later ones
tanh-GELU; open_clip's ``quick_gelu`` and ``act_kwargs`` never reach a timm tower).

Text: the text tower of these models is open_clip's own (``imagefm.convert.open_clip``); their
tokenizer is a Hugging Face one (``text_cfg.hf_tokenizer_name``) whose files an ``hf-hub`` repo
carries next to ``open_clip_config.json``; :func:`open_clip_hf_tokenizer` reads them with
open_clip's rules (pad to ``context_length``, ``tokenizer_kwargs.clean``).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefm.config import ConfigError, DualEncoderConfig, VisionConfig
from imagefm.convert.keymap import KeyMap, Rule, reshape, rule, split


@dataclass(frozen=True)
class TimmViT:
    """The shape of one registered timm ViT, as timm builds it (``timm.create_model(name)``)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int  # int(width * mlp_ratio), the blocks' and the attention pool's MLP
    act: str  # gelu (timm's default nn.GELU) or gelu_tanh (act_layer="gelu_tanh")
    norm_eps: float = 1e-6  # timm's LayerNorm default
    pool: str = "map"  # the model's own global_pool


def _family(sizes: tuple[int, ...], **shape: Any) -> dict[int, TimmViT]:
    return {size: TimmViT(image_size=size, **shape) for size in sizes}


_B16 = dict(patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072)
_L16 = dict(patch_size=16, width=1024, layers=24, heads=16, mlp_dim=4096)
_SO14 = dict(patch_size=14, width=1152, layers=27, heads=16, mlp_dim=4304)
_SO16 = dict(_SO14, patch_size=16)
_G16 = dict(patch_size=16, width=1536, layers=40, heads=16, mlp_dim=6144)

# timm's SigLIP ViTs with the attention-pool head (timm 1.0: models/vision_transformer.py).
TIMM_VITS: dict[str, TimmViT] = {
    **{f"vit_base_patch16_siglip_{s}": v
       for s, v in _family((224, 256, 384, 512), act="gelu", **_B16).items()},
    "vit_base_patch32_siglip_256": TimmViT(256, act="gelu_tanh", **dict(_B16, patch_size=32)),
    **{f"vit_large_patch16_siglip_{s}": v
       for s, v in _family((256, 384), act="gelu", **_L16).items()},
    "vit_large_patch16_siglip_512": TimmViT(512, act="gelu_tanh", **_L16),
    **{f"vit_so400m_patch14_siglip_{s}": v
       for s, v in _family((224, 378, 384), act="gelu", **_SO14).items()},
    **{f"vit_so400m_patch16_siglip_{s}": v
       for s, v in _family((256, 384, 512), act="gelu_tanh", **_SO16).items()},
    **{f"vit_giantopt_patch16_siglip_{s}": v
       for s, v in _family((256, 384), act="gelu_tanh", **_G16).items()},
}

# open_clip vision_cfg fields a timm tower reads, and those it ignores (open_clip builds the
# tower from timm_* alone; layers/width/... describe its own ViT, which is not built).
_TIMM_FIELDS = {"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj",
                "timm_proj_bias", "timm_drop", "timm_drop_path", "image_size", "patch_dropout"}
_IGNORED_FIELDS = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value",
                   "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
                   "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens",
                   "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
                   "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
                   "global_average_pool", "input_patchnorm"}


def is_timm_tower(vision_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip ``vision_cfg`` names a timm image tower."""
    return bool(vision_cfg.get("timm_model_name"))


def _timm_vit(name: str) -> TimmViT:
    try:
        return TIMM_VITS[name]
    except KeyError:
        siglips = sorted(n for n in TIMM_VITS if n.startswith(name.split("_patch")[0]))
        raise ConfigError(
            f"vision_cfg.timm_model_name = {name!r}: imagefm reads timm's SigLIP ViTs with an "
            f"attention-pool head only (e.g. {', '.join(siglips[:4] or sorted(TIMM_VITS)[:4])}); "
            f"other timm image towers are not supported") from None


def _image_projection(v: dict[str, Any]) -> str:
    """Our ``image_projection`` for open_clip's ``timm_proj`` (TimmModel's head)."""
    proj = v.get("timm_proj", "linear")  # open_clip's default
    if proj == "none":
        return "none"
    if proj == "linear":
        return "linear_bias" if v.get("timm_proj_bias", False) else "linear"
    if proj == "":  # no extra head: timm's own classifier (with bias) projects to embed_dim
        return "linear_bias"
    raise ConfigError(f"vision_cfg.timm_proj = {proj!r} is not supported (none, linear or '')")


def timm_vision_config(v: dict[str, Any]) -> tuple[VisionConfig, str]:
    """Our ViT config and ``image_projection`` for an open_clip ``vision_cfg`` with a timm tower.

    Raises :class:`ConfigError` naming the field for what our ViT cannot express.
    """
    unknown = sorted(set(v) - _TIMM_FIELDS - _IGNORED_FIELDS)
    if unknown:
        raise ConfigError(f"vision_cfg {unknown} are unknown open_clip config field(s)")
    shape = _timm_vit(v["timm_model_name"])
    # open_clip hands timm_pool to timm as global_pool ("" keeps the model's own when an extra
    # projection follows); "avg" on a SigLIP ViT would move its final norm after the mean.
    pool = v.get("timm_pool", "avg") or (shape.pool if v.get("timm_proj", "linear") in (
        "linear", "mlp") else "")
    if pool != "map":
        raise ConfigError(f"vision_cfg.timm_pool = {v.get('timm_pool', 'avg')!r}: only the "
                          f"attention-pool head ('map') of timm's SigLIP ViTs is supported")
    size = v.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(size) == 2 and size[0] == size[1] else -1
    if size != shape.image_size:
        # timm builds the tower at its registered size and refuses other inputs; open_clip's
        # image_size only sets the preprocessing, so a mismatch never ran in open_clip either.
        raise ConfigError(f"vision_cfg.image_size = {v.get('image_size')!r} but timm's "
                          f"{v['timm_model_name']} takes {shape.image_size} x {shape.image_size}")
    vision = VisionConfig(
        image_size=shape.image_size, patch_size=shape.patch_size, width=shape.width,
        layers=shape.layers, heads=shape.heads, mlp_dim=shape.mlp_dim, act=shape.act,
        norm_eps=shape.norm_eps, class_token=False, patch_bias=True, pre_norm=False, pool="map")
    return vision, _image_projection(v)


# --- key map -------------------------------------------------------------------------------------

def timm_vision_rules(config: DualEncoderConfig, vision_cfg: dict[str, Any]) -> list[Rule]:
    """Rules from open_clip's ``visual.*`` (a TimmModel around a timm ViT) to our ViT."""
    v, t = config.vision, "visual.trunk"
    ours = "vision.transformer.blocks.{i}"
    names = {"norm1": "norm1", "attn.proj": "attn.o_proj", "norm2": "norm2",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    rules = [rule(f"{t}.blocks.{{i}}.{theirs}.{p}", f"{ours}.{me}.{p}")
             for theirs, me in names.items() for p in ("weight", "bias")]
    rules += [rule(f"{t}.blocks.{{i}}.attn.qkv.{p}",  # q, k, v stacked: [3w, w]
                   [f"{ours}.attn.{x}_proj.{p}" for x in "qkv"], split(3)) for p in ("weight",
                                                                                   "bias")]
    head = {"q": "attn.q_proj", "proj": "attn.o_proj", "norm": "norm", "mlp.fc1": "mlp.fc1",
            "mlp.fc2": "mlp.fc2"}
    rules += [rule(f"{t}.attn_pool.{theirs}.{p}", f"vision.head.{me}.{p}")
              for theirs, me in head.items() for p in ("weight", "bias")]
    rules += [rule(f"{t}.attn_pool.kv.{p}",  # k, v stacked: [2w, w]
                   [f"vision.head.attn.{x}_proj.{p}" for x in "kv"], split(2)) for p in ("weight",
                                                                                      "bias")]
    rules += [
        rule(f"{t}.attn_pool.latent", "vision.head.probe"),  # [1, 1, w] on both sides
        rule(f"{t}.pos_embed", "vision.pos_embed", reshape((1, v.num_positions, v.width))),
        rule(f"{t}.patch_embed.proj.weight", "vision.patch_embed.weight"),
        rule(f"{t}.patch_embed.proj.bias", "vision.patch_embed.bias"),
        rule(f"{t}.norm.weight", "vision.norm_post.weight"),
        rule(f"{t}.norm.bias", "vision.norm_post.bias"),
    ]
    proj = vision_cfg.get("timm_proj", "linear")
    if config.image_projection != "none":
        source = f"{t}.head" if proj == "" else "visual.head.proj"
        rules.append(rule(f"{source}.weight", "image_proj.weight"))
        if config.image_projection == "linear_bias":
            rules.append(rule(f"{source}.bias", "image_proj.bias"))
    return rules


def with_timm_vision(key_map: KeyMap, config: DualEncoderConfig,
                     vision_cfg: dict[str, Any]) -> KeyMap:
    """``key_map`` (open_clip's) with its ``visual.*`` rules replaced by the timm tower's."""
    rules = [r for r in key_map.rules if not r.source.startswith("visual.")]
    return KeyMap(f"{key_map.name} + timm {vision_cfg['timm_model_name']}",
                  (*timm_vision_rules(config, vision_cfg), *rules), key_map.ignore)


# --- tokenizer -----------------------------------------------------------------------------------

_CLEAN = ("canonicalize", "lower", "whitespace")  # open_clip's tokenizer_kwargs["clean"]


def _special_ids(directory: Path) -> tuple[int | None, int | None] | None:
    """(bos, eos) ids that ``tokenizer.json``'s post-processor puts around one text, or None
    when the file has no post-processor we can read (the caller keeps the config's flags)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    processor = json.loads(path.read_text(encoding="utf-8")).get("post_processor")
    if processor and processor.get("type") == "Sequence":
        templates = [p for p in processor["processors"] if p.get("type") != "ByteLevel"]
        processor = templates[0] if len(templates) == 1 else None
    if not processor:
        return None
    kind = processor.get("type")
    if kind in ("RobertaProcessing", "BertProcessing"):
        return processor["cls"][1], processor["sep"][1]
    if kind != "TemplateProcessing":
        return None
    single = processor.get("single", [])
    text_at = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
    if text_at is None:
        raise ValueError(f"{path}: the post-processor's template has no place for the text")
    ids = {name: entry["ids"] for name, entry in processor.get("special_tokens", {}).items()}

    def one(pieces: list[dict[str, Any]]) -> int | None:
        names = [p["SpecialToken"]["id"] for p in pieces]
        if any(name not in ids for name in names):
            raise ValueError(f"{path}: the post-processor uses special tokens {names} without "
                             f"ids")
        found = [i for name in names for i in ids[name]]
        if len(found) > 1:
            raise ValueError(f"{path}: {len(found)} special tokens on one side of the text; "
                             f"imagefm's tokenizer adds at most one BOS and one EOS")
        return found[0] if found else None

    return one(single[:text_at]), one(single[text_at + 1:])


def open_clip_hf_tokenizer(directory: Path | None, text_cfg: dict[str, Any]) -> Any:
    """The tokenizer open_clip's ``HFTokenizer`` would build for ``text_cfg`` from the tokenizer
    files in ``directory`` (an ``hf-hub`` repo carries them), or None with a warning that says
    why. open_clip calls the HF tokenizer with ``padding="max_length"``, ``max_length =
    context_length`` and truncation, after its ``clean`` function.

    Known differences from open_clip's clean functions (rare in captions): open_clip also runs
    ftfy and HTML unescaping, and ``canonicalize`` turns ``_`` into a space where ours drops it;
    ``whitespace`` collapses repeated spaces, which ours leaves to the tokenizer.
    """
    from imagefm.tokenizer import Tokenizer

    name = text_cfg.get("hf_tokenizer_name")
    where = str(directory) if directory is not None else "a bare state-dict file"
    files = ("tokenizer.json", "spiece.model", "vocab.json", "imagefm_tokenizer.json")
    if directory is None or not any((directory / f).is_file() for f in files):
        warnings.warn(f"this open_clip model uses the Hugging Face tokenizer {name!r}, whose files "
                      f"(tokenizer.json or spiece.model + tokenizer_config.json) are not in "
                      f"{where}: the model is loaded without a tokenizer; copy them there (the "
                      f"hf-hub repo has them) or set model.tokenizer", stacklevel=4)
        return None
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    clean = kwargs.pop("clean", "whitespace")
    problems = []
    if text_cfg.get("tokenizer_mode"):
        problems.append(f"tokenizer_mode {text_cfg['tokenizer_mode']!r}")
    if clean not in _CLEAN:
        problems.append(f"clean {clean!r}")
    if kwargs:
        problems.append(f"tokenizer_kwargs {sorted(kwargs)}")
    try:
        if problems:
            raise ValueError(f"{', '.join(problems)} not supported")
        tokenizer = Tokenizer.from_hf_dir(directory)
        specials = _special_ids(directory)
        settings: dict[str, Any] = {}
        if specials is not None:
            settings["bos_id"], settings["eos_id"] = specials
        return tokenizer.with_settings(
            **settings, context_length=text_cfg.get("context_length", 77), padding="max_length",
            truncation=True, canonicalize=clean == "canonicalize",
            lowercase=clean in ("canonicalize", "lower"))
    except (OSError, ValueError) as err:
        warnings.warn(f"{directory}: cannot build the tokenizer {name!r} as open_clip does ({err});"
                      f" the model is loaded without a tokenizer", stacklevel=4)
        return None
