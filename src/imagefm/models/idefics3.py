"""Idefics3 and SmolVLM: a SigLIP tower over image tiles, a pixel-shuffle connector, a Llama LM.

    pixel_values [B, tiles, 3, S, S] ─► drop all-zero padding tiles ─► SigLIP ViT ─► post-norm
    pixel_attention_mask [B, tiles, S, S] ─► patch mask (positions + attention keys) ─┘    │
          ┌────────────────────────────────────────────────────────────────────────────┘
          └─► pixel shuffle (factor² neighbouring patches → one token) ─► Linear, no bias ─┐
    input_ids ─► embed_tokens ─► [<image> rows replaced by the tiles' tokens, in order] ◄──┘
              ─► DecoderLM (Llama / SmolLM2) ─► logits

The processor (:mod:`imagefm.idefics3_processor`) cuts an image into a grid of S×S tiles plus a
global view and writes ``image_seq_len`` ``<image>`` tokens per tile; the model fills them in
order and refuses a count that does not match (image tokens by contract).

The vision tower is our :class:`~imagefm.models.vit.VisionTransformer` configured as SigLIP
(patch bias, no class token, no pre-norm, post-layernorm, no head). Only its position embedding
is looked up differently: Idefics3 lets a tile be partly padding (``pixel_attention_mask``), and
gives the real patches of an h×w patch grid the positions of the trained S/p×S/p grid by
bucketing each patch's fractional coordinate (:func:`tile_position_ids`); padding patches get
position 0 and are masked out as attention keys (their outputs still reach the connector, as in
the reference). For full tiles (all the processor makes) that is the plain grid for most grid
sides; for some (19, 25, ...) the reference's float32 steps repeat a position here and there,
which we reproduce (tests/test_idefics3.py compares the ids).

Interface as transformers' ``Idefics3ForConditionalGeneration`` /
``SmolVLMForConditionalGeneration``: ``model(input_ids=, pixel_values=, pixel_attention_mask=,
attention_mask=).logits`` and ``model.generate(**batch, max_new_tokens=...)`` (greedy tokens
equal the reference's; tests/test_idefics3.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from imagefm.config import (
    HALF_MEAN_STD,
    VISION_CONFIGS,
    ConfigError,
    VisionConfig,
    check_choice,
    from_dict,
    tower_config,
)
from imagefm.models.decoder import DecoderLM, DecoderOutput
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.layers import make_attention_mask
from imagefm.models.projector import Projector
from imagefm.models.vit import VisionTransformer
from imagefm.models.vlm_base import VLMBase

MODEL_TYPES = ("idefics3", "smolvlm")
RESAMPLINGS = ("lanczos", "bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class Idefics3ImageConfig:
    """How the processor turns an image into tiles (the reference's preprocessor_config.json).

    1. ``resize``: the longest edge to ``longest_edge`` (up or down; the other side keeps the
       aspect ratio, rounded down, then up to even), capped at 4096;
    2. ``split``: both sides up to multiples of ``tile_size``, cut into tiles row by row, plus the
       whole image squashed to one tile (the global view) last; an image that fits one tile
       stays one tile. Without ``split`` every image is squashed to one tile;
    3. ``/255`` then ``(x - mean) / std``; a batch is zero-padded to its largest tile count.
    """

    longest_edge: int = 4 * 364
    tile_size: int = 364
    split: bool = True
    resize: bool = True
    interpolation: str = "lanczos"
    rescale_factor: float = 1 / 255
    normalize: bool = True
    mean: tuple[float, float, float] = HALF_MEAN_STD[0]
    std: tuple[float, float, float] = HALF_MEAN_STD[1]

    def __post_init__(self) -> None:
        check_choice("image.interpolation", self.interpolation, RESAMPLINGS)
        if self.longest_edge < 1 or self.tile_size < 1:
            raise ConfigError(f"image.longest_edge ({self.longest_edge}) and image.tile_size "
                              f"({self.tile_size}) must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("image.mean and image.std need three values, std > 0")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


@dataclass(frozen=True)
class Idefics3Config:
    """Everything that shapes an Idefics3 / SmolVLM model; saved in imagefm.json.
    ``model_type`` names the Hugging Face model to export to (the two compute the same)."""

    vision: VisionConfig
    lm: DecoderConfig
    image_token_id: int
    scale_factor: int = 2
    image: Idefics3ImageConfig = field(default_factory=Idefics3ImageConfig)
    image_token: str = "<image>"
    fake_image_token: str = "<fake_token_around_image>"
    global_image_token: str = "<global-img>"
    end_of_utterance_token: str = "<end_of_utterance>"
    model_type: str = "idefics3"  # idefics3 | smolvlm

    def __post_init__(self) -> None:
        check_choice("idefics3.model_type", self.model_type, MODEL_TYPES)
        v = self.vision
        if v.class_token or not v.patch_bias or v.pre_norm or v.pool != "mean" or v.naflex:
            raise ConfigError("idefics3.vision must be a SigLIP tower: class_token = false, "
                              "patch_bias = true, pre_norm = false, pool = 'mean', naflex = false")
        if self.scale_factor < 1 or v.grid_size % self.scale_factor:
            raise ConfigError(f"idefics3.scale_factor = {self.scale_factor} must divide the "
                              f"tower's patch grid side ({v.grid_size})")
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ConfigError(f"idefics3.image_token_id = {self.image_token_id} is not a token "
                              f"of the LM's vocabulary of {self.lm.vocab_size}")

    @property
    def image_seq_len(self) -> int:
        """LM positions one tile occupies."""
        return (self.vision.grid_size // self.scale_factor) ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Idefics3Config:
        data = dict(data)
        vision = tower_config(VISION_CONFIGS, data.pop("vision"), "vision")
        lm = DecoderConfig.from_dict(data.pop("lm"))
        image = from_dict(Idefics3ImageConfig, dict(data.pop("image", {})), "image")
        return from_dict(cls, {**data, "vision": vision, "lm": lm, "image": image}, "idefics3")

    def replace(self, **changes: Any) -> Idefics3Config:
        return dataclasses.replace(self, **changes)


def tile_position_ids(patch_mask: torch.Tensor, side: int) -> torch.Tensor:
    """Position ids [N, gh*gw] into the trained ``side``×``side`` grid for tiles whose real
    patches are ``patch_mask`` [N, gh, gw] (True = real, a top-left rectangle).

    A tile with h×w real patches maps row i to bucket ``floor(i/h * side)`` (and columns alike),
    computed in float32 with the reference's own steps so the buckets agree at their edges;
    padding patches get 0.
    """
    count, rows, cols = patch_mask.shape
    device = patch_mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    real_rows = patch_mask[:, :, 0].sum(dim=1)  # [N]
    real_cols = patch_mask[:, 0, :].sum(dim=1)

    def buckets(real: torch.Tensor, length: int) -> torch.Tensor:
        steps = torch.arange(length, device=device, dtype=torch.float32)
        coords = steps[None] * (1.0 / real)[:, None]
        return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)

    ids = buckets(real_rows, rows)[:, :, None] * side + buckets(real_cols, cols)[:, None, :]
    return torch.where(patch_mask, ids, 0).reshape(count, -1)


class Idefics3(VLMBase):
    """``model(input_ids, pixel_values, pixel_attention_mask, attention_mask).logits``.

    The tokenizer and chat template live on the inner LM (as :class:`~imagefm.models.vlm.VLM`);
    the submodules are named ``vision``, ``projector`` and ``lm`` like the LLaVA-style VLM's, so
    the Trainer's stages (align, sft, LoRA on ``lm``) apply unchanged.
    """

    architecture = "idefics3"  # the name imagefm.json records (imagefm.loading maps it back)

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.projector = Projector("pixel_shuffle", config.vision.width, config.lm.width,
                                   factor=config.scale_factor, bias=False)
        self.lm = DecoderLM(config.lm)

    # --- the forward pass ------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor,
                       pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of every real tile, in order: [tiles, image_seq_len, lm width].

        ``pixel_values`` [B, tiles, 3, H, W] as the processor pads them (or [tiles, 3, H, W]);
        tiles that are all zeros are padding and are dropped, as in the reference.
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
            if pixel_attention_mask is not None and pixel_attention_mask.dim() == 3:
                pixel_attention_mask = pixel_attention_mask[:, None]
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, tiles, 3, H, W] as the processor "
                             f"gives them, got {tuple(pixel_values.shape)}")
        tiles = pixel_values.flatten(0, 1)
        real = (tiles != 0).flatten(1).any(dim=1)
        tiles = tiles[real]
        size = self.config.vision.patch_size
        if pixel_attention_mask is None:
            patch_mask = torch.ones(tiles.shape[0], tiles.shape[2] // size,
                                    tiles.shape[3] // size, dtype=torch.bool, device=tiles.device)
        else:
            pixels = pixel_attention_mask.flatten(0, 1)[real].bool()
            rows, cols = pixels.shape[1] // size, pixels.shape[2] // size
            pixels = pixels[:, :rows * size, :cols * size]
            patch_mask = pixels.reshape(-1, rows, size, cols, size).any(dim=(2, 4))
        return self.projector(self.encode_tiles(tiles, patch_mask))

    def encode_tiles(self, tiles: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden states after its post-norm, [N, patches, width]."""
        vit = self.vision
        x = vit.patch_embed(tiles.to(vit.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        ids = tile_position_ids(patch_mask, vit.config.grid_size)
        x = x + vit.pos_embed[ids].to(x.dtype)
        flat = patch_mask.flatten(1)
        mask = None if bool(flat.all()) else make_attention_mask(x.shape[1], flat)
        return vit.norm_post(vit.transformer(x, mask))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              pixel_attention_mask: torch.Tensor | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the ``<image>`` rows replaced by the tiles' tokens, in order."""
        embeds = self.lm.embed_tokens(input_ids)
        slots = input_ids == self.config.image_token_id
        found = int(slots.sum())
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, pixel_attention_mask)
        if image_features is None:
            if found:
                raise ValueError(f"input_ids hold {found} {self.config.image_token} tokens but "
                                 f"no pixel_values were given")
            return embeds
        rows = image_features.reshape(-1, embeds.shape[-1])
        if found != rows.shape[0]:
            raise ValueError(
                f"input_ids hold {found} {self.config.image_token} tokens but the images give "
                f"{rows.shape[0]} ({self.config.image_seq_len} per tile): build the inputs with "
                f"the model's processor, which writes that many per tile")
        return embeds.masked_scatter(slots[..., None], rows.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **lm_options: Any,
    ) -> DecoderOutput:
        """Logits [B, L, vocab] (and the next-token loss when ``labels`` are given).
        ``lm_options`` go to :class:`~imagefm.models.decoder.DecoderLM` (``cache``,
        ``position_ids``, ``logits_to_keep``...)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed(input_ids, pixel_values, pixel_attention_mask,
                                       image_features)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       **lm_options)

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 pixel_attention_mask: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 do_sample: bool = False, **kwargs: Any) -> torch.Tensor:
        """Continue the prompts with the KV cache; [B, L + new] ids, prompt included. Options
        are those of :func:`imagefm.models.generation.generate_tokens`."""
        images = {"pixel_values": pixel_values, "pixel_attention_mask": pixel_attention_mask}
        return self.generate_with(input_ids, attention_mask, images,
                                  max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def generation_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                          pixel_attention_mask: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """What the LM's generation loop needs besides the ids: ``inputs_embeds`` with the
        images spliced in (pass them on to ``generate_tokens`` or ``TextStream`` with
        ``self.lm``); positions are the decoder's own."""
        del attention_mask
        return {"inputs_embeds": self.embed(input_ids, pixel_values, pixel_attention_mask)}

    # --- conveniences ---------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision.transformer.gradient_checkpointing = enabled
        self.lm.gradient_checkpointing = enabled
