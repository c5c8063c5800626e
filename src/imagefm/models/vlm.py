"""A LLaVA-style vision-language model: vision tower → projector → decoder LM.

    pixels ─► VisionTransformer.hidden_states(feature layer) ─► (drop CLS) ─► Projector ─┐
              (or EfficientNet-Lite's last feature map, one token per cell)               │
    input_ids ─► embed_tokens ─► [image placeholder rows replaced by image tokens] ◄──────┘
                                 ─► DecoderLM ─► logits

Image tokens by contract: the processor (:mod:`imagefm.vlm_processor`) expands each ``<image>``
into exactly ``config.image_tokens`` copies of ``image_token_id``; the model fills those rows
with the projected image features, in order, and refuses a count that does not match.

Speech, optionally (``config.audio``, None by default; :mod:`imagefm.models.audio_input`): an
audio tower and projector turn log-mel ``input_features`` into ``audio.tokens`` LM tokens per
clip, which fill the ``<audio>`` placeholder rows the same way (:func:`add_audio` gives an
existing VLM one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from imagefm.config import (
    CLIP_MEAN_STD,
    VISION_CONFIGS,
    ConfigError,
    EfficientNetLiteConfig,
    ImageCard,
    VisionConfig,
    check_choice,
    from_dict,
    tower_config,
)
from imagefm.models.audio_input import AudioInput, AudioInputConfig, splice
from imagefm.models.decoder import DecoderLM, DecoderOutput
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.projector import PROJECTORS, Projector
from imagefm.models.quantized import describe_quantization
from imagefm.models.towers import build_vision_tower
from imagefm.models.vit import VisionTransformer
from imagefm.models.vlm_base import VLMBase
from imagefm.models.vocab import extend_vocabulary
from imagefm.models.whisper_encoder import AudioEncoder

FEATURE_SELECTS = ("default", "full")  # default: patch tokens only (drop CLS); full: all tokens


@dataclass(frozen=True)
class VLMConfig:
    """Everything that shapes a VLM; saved with every checkpoint.

    ``vision_feature_layer`` indexes the vision tower's hidden states as Hugging Face does:
    0 is the embedding output, k the output of block k, -1 the last block, -2 (LLaVA-1.5) the
    one before. No post-norm is applied to these features.
    """

    vision: VisionConfig | EfficientNetLiteConfig
    lm: DecoderConfig
    image_token_id: int
    image_token: str = "<image>"
    projector: str = "mlp2x_gelu"  # mlp2x_gelu | pixel_shuffle
    pixel_shuffle: int = 1  # pixel_shuffle projector: merge factor² patches into one token
    projector_bias: bool = True
    vision_feature_layer: int = -1
    vision_feature_select: str = "default"
    audio: AudioInputConfig | None = None  # an audio tower for spoken input (None: none)

    def __post_init__(self) -> None:
        check_choice("vlm.projector", self.projector, PROJECTORS)
        check_choice("vlm.vision_feature_select", self.vision_feature_select, FEATURE_SELECTS)
        if self.pixel_shuffle < 1 or (self.projector == "mlp2x_gelu" and self.pixel_shuffle != 1):
            raise ConfigError(f"vlm.pixel_shuffle = {self.pixel_shuffle}: use 1 with the "
                              f"mlp2x_gelu projector, or a factor >= 1 with pixel_shuffle")
        layers = getattr(self.vision, "layers", 0)  # a convolutional tower: its last map only
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ConfigError(f"vlm.vision_feature_layer = {self.vision_feature_layer} is outside "
                              f"the tower's {layers + 1} hidden states")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ConfigError(f"vlm.image_token_id = {self.image_token_id} is not a token of the "
                              f"LM's vocabulary of {self.lm.vocab_size}")
        if self.audio is not None and not (0 <= self.audio.token_id < self.lm.vocab_size
                                           and self.audio.token_id != self.image_token_id):
            raise ConfigError(f"vlm.audio.token_id = {self.audio.token_id} must be a token of "
                              f"the LM's vocabulary other than the image token")
        grid = self.grid_size
        if self.pixel_shuffle > 1 and (grid % self.pixel_shuffle or self.keeps_class_token):
            raise ConfigError(f"vlm.pixel_shuffle = {self.pixel_shuffle} needs a patch grid "
                              f"divisible by it ({grid}x{grid} here) and patch tokens only "
                              f"(vision_feature_select = 'default')")

    @property
    def is_vit(self) -> bool:
        return isinstance(self.vision, VisionConfig)

    @property
    def grid_size(self) -> int:
        """Side of the vision tower's output grid (EfficientNet downsamples 32x)."""
        return self.vision.grid_size if self.is_vit else self.vision.image_size // 32

    @property
    def keeps_class_token(self) -> bool:
        return self.is_vit and self.vision.class_token and self.vision_feature_select == "full"

    @property
    def feature_blocks(self) -> int:
        """How many vision blocks run to reach ``vision_feature_layer``."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else getattr(self.vision, "layers", 0) + 1 + layer

    @property
    def image_tokens(self) -> int:
        """LM positions one image occupies."""
        return (self.grid_size // self.pixel_shuffle) ** 2 + int(self.keeps_class_token)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VLMConfig:
        data = dict(data)
        vision = tower_config(VISION_CONFIGS, data.pop("vision"), "vision")
        lm = DecoderConfig.from_dict(data.pop("lm"))
        audio = data.pop("audio", None)
        audio = AudioInputConfig.from_dict(audio) if audio is not None else None
        return from_dict(cls, {**data, "vision": vision, "lm": lm, "audio": audio}, "vlm")

    def replace(self, **changes: Any) -> VLMConfig:
        return dataclasses.replace(self, **changes)


def vlm_card(vision: VisionConfig) -> ImageCard:
    """CLIP preprocessing at the tower's resolution (what a LLaVA-style tower expects)."""
    mean, std = CLIP_MEAN_STD
    return ImageCard(vision.image_size, "shortest", "bicubic", mean, std)


class VLM(VLMBase):
    """``vlm(input_ids, pixel_values, attention_mask, labels).logits`` / ``vlm.generate(...)``.

    The tokenizer and chat template live on the inner LM (``vlm.tokenizer`` reads them there),
    so every LM utility (chat templates, stop tokens, streaming) works on ``vlm.lm``.
    """

    architecture = "vlm"  # the name imagefm.json records (imagefm.loading maps it back)

    def __init__(self, config: VLMConfig, card: ImageCard | None = None) -> None:
        super().__init__()
        self.config = config
        self.card = card or vlm_card(config.vision)
        self.vision = build_vision_tower(config.vision)
        self.projector = Projector(config.projector, config.vision.width, config.lm.width,
                                   factor=config.pixel_shuffle, bias=config.projector_bias)
        self.lm = DecoderLM(config.lm)
        self.audio = AudioInput(config.audio, config.lm.width) if config.audio else None

    @classmethod
    def from_parts(cls, vision: VisionTransformer, lm: DecoderLM, card: ImageCard, *,
                   image_token_id: int, **options: Any) -> VLM:
        """A VLM around an existing (e.g. pretrained) vision tower and LM; a new projector."""
        config = VLMConfig(vision=vision.config, lm=lm.config, image_token_id=image_token_id,
                           **options)
        model = cls.__new__(cls)  # not __init__: it would build (and initialise) new towers
        nn.Module.__init__(model)
        model.config, model.card = config, card
        model.vision = vision
        model.projector = Projector(config.projector, config.vision.width, config.lm.width,
                                    factor=config.pixel_shuffle, bias=config.projector_bias)
        model.lm = lm
        model.audio = AudioInput(config.audio, config.lm.width) if config.audio else None
        return model

    # --- the forward pass ------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [images, image_tokens, lm_width]."""
        if not self.config.is_vit:  # a convolutional tower: one token per cell of its last map
            tokens = self.vision.feature_map(pixel_values).flatten(2).transpose(1, 2)
            return self.projector(tokens)
        tokens = self.vision.hidden_states(pixel_values, self.config.feature_blocks)
        if self.config.vision.class_token and not self.config.keeps_class_token:
            tokens = tokens[:, 1:]
        return self.projector(tokens)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None,
              input_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's placeholder rows replaced by its features (and
        each spoken clip's by its audio tokens)."""
        embeds = self.embed_images(input_ids, pixel_values, image_features)
        if self.audio is None:
            if input_features is not None:
                raise ValueError("input_features were given but this VLM has no audio tower")
            return embeds
        clips = self.audio(input_features) if input_features is not None else None
        return splice(embeds, input_ids, self.config.audio.token_id, clips)

    def embed_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's placeholder rows replaced by its features."""
        embeds = self.lm.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        found = int(slots.sum())
        if pixel_values is None and image_features is None:
            if found:
                raise ValueError(f"input_ids hold {found} image placeholder tokens but no "
                                 f"pixel_values were given")
            return embeds
        if image_features is None:
            image_features = self.image_features(pixel_values)
        expected = image_features.shape[0] * image_features.shape[1]
        if found != expected:
            raise ValueError(
                f"input_ids hold {found} image placeholder tokens but {image_features.shape[0]} "
                f"image(s) need {expected} ({self.config.image_tokens} each): build the inputs "
                f"with the model's processor, which expands each {self.config.image_token!r} "
                f"into exactly that many")
        features = image_features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(slots[..., None], features)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                input_features: torch.Tensor | None = None, **lm_options: Any) -> DecoderOutput:
        """Logits [B, L, vocab] (and the next-token loss when ``labels`` are given)."""
        embeds = self.embed(input_ids, pixel_values, image_features, input_features)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                       **lm_options)

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, input_features: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        """Continue the prompts; [B, L + new] ids, prompt included (see DecoderLM.generate)."""
        return self.generate_with(input_ids, attention_mask,
                                  {"pixel_values": pixel_values, "input_features": input_features},
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def generation_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None,
                          input_features: torch.Tensor | None = None) -> dict[str, Any]:
        """``inputs_embeds`` with the images (and clips) spliced in (positions are the
        decoder's own)."""
        del attention_mask
        return {"inputs_embeds": self.embed(input_ids, pixel_values,
                                            input_features=input_features)}

    # --- conveniences ---------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        getattr(self.vision, "transformer", self.vision).gradient_checkpointing = enabled
        self.lm.gradient_checkpointing = enabled

    def checkpoint_meta(self) -> dict[str, Any]:
        """What imagefm.json records besides the config: a quantised model's layer counts."""
        quantization = describe_quantization(self)
        return {"quantization": quantization} if quantization is not None else {}


def compose_vlm(vision: nn.Module, lm: DecoderLM, *, card: ImageCard | None = None,
                image_token: str = "<image>", **options: Any) -> VLM:
    """A new VLM from a pretrained vision tower and LM, with a freshly initialised projector.

    ``vision`` is a dual encoder (its image tower is used, with its preprocessing card) or a
    bare :class:`VisionTransformer` / EfficientNet-Lite (e.g. the locked tower of
    ``lit-effnet``). ``image_token`` is added to the LM's tokenizer as one whole
    token (growing its embedding by a row) when it is not one already. ``options`` are
    :class:`VLMConfig` fields: ``projector``, ``pixel_shuffle``, ``vision_feature_layer``...
    """
    from imagefm.models.efficientnet import EfficientNetLite

    tower = getattr(vision, "vision", vision)
    if not isinstance(tower, (VisionTransformer, EfficientNetLite)):
        raise ConfigError(f"the vision model must be a ViT or EfficientNet-Lite (or a dual "
                          f"encoder with one), got {type(tower).__name__}")
    if lm.tokenizer is None:
        raise ConfigError("the language model has no tokenizer; load it from a checkpoint with one")
    card = card or getattr(vision, "card", None) or vlm_card(tower.config)
    extend_vocabulary(lm, [image_token])
    image_token_id = lm.tokenizer.token_to_id(image_token)
    if image_token_id is None:
        raise ConfigError(f"{image_token!r} could not be made a token of the LM's vocabulary")
    return VLM.from_parts(tower, lm, card, image_token_id=image_token_id, image_token=image_token,
                          **options)


def add_audio(vlm: VLM, encoder: Any, *, seconds: float = 4.0, stack: int = 8,
              token: str = "<audio>") -> VLM:
    """Give ``vlm`` a new (randomly initialised) audio tower and projector, in place.

    ``encoder`` is an :class:`~imagefm.models.whisper_encoder.AudioEncoderConfig` or an
    :class:`~imagefm.models.whisper_encoder.AudioEncoder` (e.g. converted Whisper weights),
    whose weights are then kept, or a model holding one as ``encoder`` (a CTC-pretrained
    :class:`~imagefm.models.speech_ctc.SpeechCTC`). ``token`` joins the LM's vocabulary as
    one whole token.
    """
    if vlm.audio is not None:
        raise ConfigError("this VLM already has an audio tower")
    if isinstance(getattr(encoder, "encoder", None), AudioEncoder):
        trained = getattr(encoder.config, "seconds", seconds)
        if trained != seconds:  # the padded length changes the features the tower learned on
            raise ConfigError(f"this audio tower was trained on {trained:g} s clips: give the "
                              f"VLM the same (vlm-add-audio --seconds {trained:g})")
        encoder = encoder.encoder
    tower = encoder if isinstance(encoder, AudioEncoder) else None
    config = tower.config if tower is not None else encoder
    extend_vocabulary(vlm.lm, [token])
    token_id = vlm.lm.tokenizer.token_to_id(token)
    if token_id is None:
        raise ConfigError(f"{token!r} could not be made a token of the LM's vocabulary")
    audio = AudioInputConfig(config, token_id, token, seconds=seconds, stack=stack)
    vlm.config = vlm.config.replace(lm=vlm.lm.config, audio=audio)
    device = vlm.lm.embed_tokens.weight.device
    vlm.audio = AudioInput(audio, vlm.config.lm.width).to(device)
    if tower is not None:
        vlm.audio.encoder.load_state_dict(tower.state_dict())
    return vlm
