"""Configuration as data: frozen dataclasses that are saved with every checkpoint.

Every numerical choice a model depends on (activation, norm eps, pooling, masks, projection kind,
preprocessing) lives here and is written to ``imagefm.json``. Nothing is inferred from a model's
name or path. Unknown keys are refused when a config is read, so a typo fails loudly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "relu", "silu")
VISION_POOLS = ("cls", "map", "mean")
TEXT_POOLS = ("argmax", "eos", "last", "first")
# mlp: Linear -> GELU -> Linear, no biases, hidden (width + embed_dim) // 2 (open_clip's
# HFTextEncoder proj_type "mlp"); imagenet_prior (image side): linear + the ImageNet head's class
# distribution over text embeddings of the class names (imagefm.models.class_prior)
PROJECTIONS = ("linear", "linear_bias", "none", "mlp", "imagenet_prior")
RESIZE_MODES = ("shortest", "squash", "pad", "naflex")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class ConfigError(ValueError):
    """A configuration is invalid; the message says which field and what to change."""


def check_choice(key: str, value: Any, choices: tuple) -> None:
    """Refuse ``value`` for the setting ``key`` (e.g. ``"vision.pool"``) unless it is one of
    ``choices``; every config in imagefm words this error the same way."""
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(choices)}")


# Inference arithmetic (index, serve, the embedding helpers): fp32, or bfloat16 autocast.
INFERENCE_PRECISIONS = ("fp32", "bf16")


def _check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{owner}.{name} must be > 0, got {value!r}")


@dataclass(frozen=True)
class VisionConfig:
    """A vision transformer: patch embedding, pre-LN blocks, pooling."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True  # CLIP has one; SigLIP does not
    patch_bias: bool = False  # CLIP's conv has no bias; SigLIP's does
    pre_norm: bool = True  # CLIP's ln_pre before the blocks
    pool: str = "cls"  # cls | map (SigLIP attention-pool head) | mean
    in_channels: int = 3
    # patch: one strided convolution (ViT); conv: 3x3 stride-2 convolutions down to the patch
    # grid ("Early convolutions help transformers see better"), much faster to train when small.
    stem: str = "patch"
    model_type: str = "vit"  # the tower kind (see VISION_CONFIGS)
    # NaFlex (SigLIP 2's variable resolution and aspect ratio): the input is the processor's
    # patches [B, N, C*p*p] with pixel_attention_mask and spatial_shapes, embedded by a Linear;
    # the square position grid (image_size / patch_size a side) is resized to each image's own
    # patch grid (bilinear, antialiased), and padding patches are masked out of attention/pooling.
    naflex: bool = False

    def __post_init__(self) -> None:
        check_choice("vision.model_type", self.model_type, ("vit",))
        check_choice("vision.act", self.act, ACTIVATIONS)
        check_choice("vision.pool", self.pool, VISION_POOLS)
        check_choice("vision.stem", self.stem, ("patch", "conv"))
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ConfigError(f"vision.stem = 'conv' needs a power-of-two patch_size >= 2, "
                              f"got {self.patch_size}")
        _check_positive("vision", image_size=self.image_size, patch_size=self.patch_size,
                        width=self.width, layers=self.layers, heads=self.heads,
                        mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        if self.width % self.heads:
            raise ConfigError(f"vision.width ({self.width}) must be divisible by vision.heads "
                              f"({self.heads})")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision.image_size ({self.image_size}) must be at least "
                              f"vision.patch_size ({self.patch_size})")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("vision.pool = 'cls' needs vision.class_token = true")
        if self.naflex and (self.class_token or self.stem != "patch"):
            raise ConfigError("vision.naflex = true needs class_token = false and stem = 'patch' "
                              "(NaFlex embeds each patch with one Linear, no class token)")

    @property
    def grid_size(self) -> int:
        # A remainder is dropped, as the strided patch convolution does (SigLIP so400m: 384/14).
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size**2 + int(self.class_token)


@dataclass(frozen=True)
class TextConfig:
    """A text transformer: causal with EOS pooling (CLIP) or bidirectional, last token (SigLIP)."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: str = "argmax"  # argmax (CLIP: EOS has the largest id) | eos | last | first
    eos_token_id: int | None = None  # used by pool = "eos"
    use_padding_mask: bool = True  # apply attention_mask to keys (HF does; open_clip does not)
    model_type: str = "transformer"  # the tower kind (see TEXT_CONFIGS)

    def __post_init__(self) -> None:
        check_choice("text.model_type", self.model_type, ("transformer",))
        check_choice("text.act", self.act, ACTIVATIONS)
        check_choice("text.pool", self.pool, TEXT_POOLS)
        _check_positive("text", vocab_size=self.vocab_size, context_length=self.context_length,
                        width=self.width, layers=self.layers, heads=self.heads,
                        mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        if self.width % self.heads:
            raise ConfigError(f"text.width ({self.width}) must be divisible by text.heads "
                              f"({self.heads})")
        if self.pool == "eos" and self.eos_token_id is None:
            raise ConfigError("text.pool = 'eos' needs text.eos_token_id")


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """An EfficientNet-Lite image tower (Lite0 by default), pooled to ``width`` features.

    The Lite family (TF "efficientnet/lite"): MBConv blocks without squeeze-excitation, ReLU6,
    TensorFlow "same" padding, stem (32) and head (1280) channels not scaled. BatchNorm always
    uses its running statistics (never the batch's), so a locked tower is a pure function and an
    unlocked one fine-tunes with frozen statistics, whatever the batch size.
    """

    model_type: str = "efficientnet_lite"
    image_size: int = 224
    width_coefficient: float = 1.0  # Lite0: 1.0 / 1.0; Lite4: 1.4 / 1.8
    depth_coefficient: float = 1.0
    stem_channels: int = 32
    width: int = 1280  # channels of the 1x1 head convolution = the pooled feature size
    act: str = "relu6"
    norm_eps: float = 1e-3
    in_channels: int = 3

    def __post_init__(self) -> None:
        check_choice("vision.model_type", self.model_type, ("efficientnet_lite",))
        check_choice("vision.act", self.act, ("relu6", *ACTIVATIONS))
        _check_positive("vision", image_size=self.image_size, width=self.width,
                        width_coefficient=self.width_coefficient,
                        depth_coefficient=self.depth_coefficient,
                        stem_channels=self.stem_channels, norm_eps=self.norm_eps)


@dataclass(frozen=True)
class BertConfig:
    """A BERT text encoder (post-LN blocks, learned positions and token types), pooled as
    sentence-transformers does (``mean`` over real tokens), at ``[CLS]`` (``first``) or through
    BERT's pooler (``pooler``: dense + tanh over ``[CLS]``, HF's ``pooler_output``). RoBERTa and
    XLM-RoBERTa are this tower with ``positions = "roberta"`` (and one token type)."""

    causal: ClassVar[bool] = False  # bidirectional; read by the tokenizer pooling checks

    model_type: str = "bert"
    vocab_size: int = 30522
    context_length: int = 64  # tokens the tokenizer keeps (at most max_positions)
    max_positions: int = 512
    type_vocab_size: int = 2
    width: int = 384
    layers: int = 6
    heads: int = 12
    mlp_dim: int = 1536
    act: str = "gelu"
    norm_eps: float = 1e-12
    pool: str = "mean"  # mean | first | pooler
    pad_token_id: int = 0
    # arange: position i for column i (BERT). roberta: RoBERTa's create_position_ids_from_input_ids,
    # pad_token_id + 1 + the token's index among the non-pad tokens; pad tokens at pad_token_id.
    positions: str = "arange"
    # given: attention_mask as passed (none: every token attends); pad_id: tokens equal to
    # pad_token_id are masked out whatever is passed (open_clip's HFTextEncoder).
    padding_mask: str = "given"

    def __post_init__(self) -> None:
        check_choice("text.model_type", self.model_type, ("bert",))
        check_choice("text.act", self.act, ACTIVATIONS)
        check_choice("text.pool", self.pool, ("mean", "first", "pooler"))
        check_choice("text.positions", self.positions, ("arange", "roberta"))
        check_choice("text.padding_mask", self.padding_mask, ("given", "pad_id"))
        _check_positive("text", vocab_size=self.vocab_size, context_length=self.context_length,
                        max_positions=self.max_positions, type_vocab_size=self.type_vocab_size,
                        width=self.width, layers=self.layers, heads=self.heads,
                        mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)
        if self.width % self.heads:
            raise ConfigError(f"text.width ({self.width}) must be divisible by text.heads "
                              f"({self.heads})")
        if self.context_length > self.max_text_length:
            raise ConfigError(f"text.context_length ({self.context_length}) exceeds the "
                              f"{self.max_text_length} tokens text.max_positions "
                              f"({self.max_positions}) leaves with positions = "
                              f"{self.positions!r}")

    @property
    def max_text_length(self) -> int:
        """The longest text the position table holds (RoBERTa's first pad_token_id + 1 rows are
        never used by text)."""
        offset = self.pad_token_id + 1 if self.positions == "roberta" else 0
        return self.max_positions - offset


# Tower kinds by the ``model_type`` saved in each tower's config (absent: the first kind).
VISION_CONFIGS: dict[str, type] = {"vit": VisionConfig,
                                   "efficientnet_lite": EfficientNetLiteConfig}
TEXT_CONFIGS: dict[str, type] = {"transformer": TextConfig, "bert": BertConfig}


def tower_config(kinds: dict[str, type], data: Any, owner: str) -> Any:
    """The tower config a dict describes, its class picked by ``model_type`` among ``kinds``
    (the first when absent); a config object passes through. Shared by dual encoders and VLMs."""
    if not isinstance(data, dict):
        return data  # already a config object
    kind = data.get("model_type", next(iter(kinds)))
    check_choice(f"{owner}.model_type", kind, tuple(kinds))
    return from_dict(kinds[kind], data, owner)


@dataclass(frozen=True)
class ImageCard:
    """How images are turned into pixel values for one model (its preprocessing card)."""

    image_size: int = 224
    # shortest: resize the shortest side, then centre crop; squash: resize to a square
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # naflex only (SigLIP 2): keep the aspect ratio, resize so that at most max_num_patches
    # patches of patch_size pixels cover the image, and give the patches themselves, padded to
    # max_num_patches (imagefm.data.naflex); image_size is then informational only: the side of
    # the square image that fills the patch budget.
    patch_size: int | None = None
    max_num_patches: int | None = None

    def __post_init__(self) -> None:
        check_choice("preprocess.resize_mode", self.resize_mode, RESIZE_MODES)
        check_choice("preprocess.interpolation", self.interpolation, INTERPOLATIONS)
        _check_positive("preprocess", image_size=self.image_size)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("preprocess.mean and preprocess.std need three values (RGB)")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess.std must be > 0, got {self.std}")
        # JSON gives lists; keep tuples so the card stays hashable and frozen.
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        naflex = self.resize_mode == "naflex"
        if naflex != (self.patch_size is not None) or naflex != (self.max_num_patches is not None):
            raise ConfigError("preprocess.patch_size and preprocess.max_num_patches are set "
                              "exactly when preprocess.resize_mode = 'naflex'")
        if naflex:
            _check_positive("preprocess", patch_size=self.patch_size,
                            max_num_patches=self.max_num_patches)


CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
LITE_MEAN_STD = ((127 / 255,) * 3, (128 / 255,) * 3)  # 0.498 / 0.502


@dataclass(frozen=True)
class DualEncoderConfig:
    """A CLIP or SigLIP dual encoder: two towers, two projections, a temperature (and a bias)."""

    model_type: str = "clip"  # clip | siglip: decides the default loss, nothing else
    vision: VisionConfig | EfficientNetLiteConfig = field(default_factory=VisionConfig)
    text: TextConfig | BertConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    # linear | linear_bias | none (SigLIP: the pooled output is the embedding)
    image_projection: str = "linear"
    text_projection: str = "linear"  # SigLIP: linear_bias (its text "head")
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None  # SigLIP: -10

    def __post_init__(self) -> None:
        check_choice("model.model_type", self.model_type, ("clip", "siglip"))
        check_choice("model.image_projection", self.image_projection, PROJECTIONS)
        check_choice("model.text_projection", self.text_projection, PROJECTIONS)
        _check_positive("model", embed_dim=self.embed_dim)
        if self.text_projection == "imagenet_prior":
            raise ConfigError("model.text_projection = 'imagenet_prior' is an image projection "
                              "(the ImageNet head's classes); use linear for the text side")
        if self.image_projection == "none" and self.vision.width != self.embed_dim:
            raise ConfigError(f"model.image_projection = 'none' needs vision.width "
                              f"({self.vision.width}) == embed_dim ({self.embed_dim})")
        if self.text_projection == "none" and self.text.width != self.embed_dim:
            raise ConfigError(f"model.text_projection = 'none' needs text.width "
                              f"({self.text.width}) == embed_dim ({self.embed_dim})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualEncoderConfig:
        data = dict(data)
        vision = tower_config(VISION_CONFIGS, data.pop("vision", {}), "vision")
        text = tower_config(TEXT_CONFIGS, data.pop("text", {}), "text")
        return from_dict(cls, {**data, "vision": vision, "text": text}, "model")

    def replace(self, **changes: Any) -> DualEncoderConfig:
        return dataclasses.replace(self, **changes)


T = TypeVar("T")


def merge_nested(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, nested mappings merged key by key (config overrides
    such as ``model.config={vision: {layers: 2}}`` on top of a preset)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


def from_dict(cls: type[T], data: dict[str, Any], owner: str = "") -> T:
    """Build a dataclass from a dict, refusing unknown keys with a message naming them."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {owner or cls.__name__}: {', '.join(unknown)}; "
                          f"known keys are: {', '.join(sorted(names))}")
    return cls(**data)


# --- presets -------------------------------------------------------------------------------------
# Shapes follow the published models; `tiny` is for CPU tests and the quickstart.

def _clip(vision: VisionConfig, text: TextConfig, embed_dim: int) -> DualEncoderConfig:
    return DualEncoderConfig("clip", vision, text, embed_dim)


def _siglip(vision: VisionConfig, text: TextConfig) -> DualEncoderConfig:
    return DualEncoderConfig(
        "siglip", vision, text, embed_dim=vision.width, image_projection="none",
        text_projection="linear_bias", init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


def _siglip_vision(**kw: Any) -> VisionConfig:
    defaults = dict(act="gelu_tanh", norm_eps=1e-6, class_token=False, patch_bias=True,
                    pre_norm=False, pool="map")
    return VisionConfig(**{**defaults, **kw})


def _siglip_text(**kw: Any) -> TextConfig:
    defaults = dict(vocab_size=32000, context_length=64, act="gelu_tanh", norm_eps=1e-6,
                    causal=False, pool="last")
    return TextConfig(**{**defaults, **kw})


PRESETS: dict[str, DualEncoderConfig] = {
    "tiny": _clip(
        VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512,
                     act="gelu"),
        TextConfig(vocab_size=4096, context_length=32, width=128, layers=4, heads=4, mlp_dim=512,
                   act="gelu"),
        embed_dim=128),
    "small": _clip(
        VisionConfig(image_size=128, patch_size=16, width=384, layers=6, heads=6, mlp_dim=1536,
                     act="gelu"),
        TextConfig(vocab_size=16384, context_length=48, width=256, layers=6, heads=4,
                   mlp_dim=1024, act="gelu"),
        embed_dim=256),
    "clip-vit-b-16": _clip(
        VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072),
        TextConfig(), embed_dim=512),
    "clip-vit-b-32": _clip(
        VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_dim=3072),
        TextConfig(), embed_dim=512),
    "clip-vit-l-14": _clip(
        VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096),
        TextConfig(width=768, heads=12, mlp_dim=3072), embed_dim=768),
    "siglip-tiny": _siglip(
        _siglip_vision(image_size=64, patch_size=8, width=128, layers=4, heads=4, mlp_dim=512),
        _siglip_text(vocab_size=4096, context_length=32, width=128, layers=4, heads=4,
                     mlp_dim=512)),
    "siglip-vit-b-16": _siglip(
        _siglip_vision(image_size=224, patch_size=16, width=768, layers=12, heads=12,
                       mlp_dim=3072),
        _siglip_text(width=768, layers=12, heads=12, mlp_dim=3072)),
}
PRESETS["base"] = PRESETS["clip-vit-b-16"]
# LiT with real pretrained towers from PyPI (imagefm.convert.towers.PRESET_TOWERS): a locked
# ImageNet EfficientNet-Lite0 and a BERT sentence encoder: multilingual-e5-small (Korean too) or,
# in lit-effnet-en, the English all-MiniLM-L6-v2.
PRESETS["lit-effnet"] = DualEncoderConfig(
    "clip", EfficientNetLiteConfig(),
    BertConfig(vocab_size=250037, layers=12, pad_token_id=1), embed_dim=384)
PRESETS["lit-effnet-en"] = DualEncoderConfig("clip", EfficientNetLiteConfig(), BertConfig(),
                                             embed_dim=384)
# lit-effnet whose image projection adds the ImageNet head's class distribution over the text
# embeddings of the class names (built by imagefm.convert.class_prior, train/presets.py).
PRESETS["lit-effnet-prior"] = dataclasses.replace(PRESETS["lit-effnet"],
                                                  image_projection="imagenet_prior")


def preset(name: str, **overrides: Any) -> DualEncoderConfig:
    """A named preset, optionally with top-level fields replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def default_card(config: DualEncoderConfig) -> ImageCard:
    """The preprocessing card a freshly initialised model of this config uses."""
    if config.vision.model_type == "efficientnet_lite":
        # TF EfficientNet-Lite: (pixel - 127) / 128 on 0..255; ImageNet eval resizes bilinearly.
        return ImageCard(config.vision.image_size, "shortest", "bilinear", LITE_MEAN_STD[0],
                         LITE_MEAN_STD[1])
    if getattr(config.vision, "naflex", False):  # SigLIP 2 NaFlex: budget = the position grid
        mean, std = HALF_MEAN_STD
        return ImageCard(config.vision.image_size, "naflex", "bilinear", mean, std,
                         patch_size=config.vision.patch_size,
                         max_num_patches=config.vision.grid_size**2)
    if config.model_type == "siglip":
        mean, std = HALF_MEAN_STD
        return ImageCard(config.vision.image_size, "squash", "bilinear", mean, std)
    mean, std = CLIP_MEAN_STD
    return ImageCard(config.vision.image_size, "shortest", "bicubic", mean, std)
