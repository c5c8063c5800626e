"""Configuration of a Llama/Qwen2/Qwen3-family decoder language model, saved with every checkpoint.

The families differ only in data written here, never in code paths chosen by name:
Qwen2 has biases on q/k/v (``qkv_bias``), Llama may have them on all four projections
(``attention_bias`` in its config.json -> ``qkv_bias`` and ``o_bias``) and on the MLP; Qwen3
normalises each head's queries and keys (``qk_norm``) and sets ``head_dim`` explicitly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from imagefm.config import ConfigError, check_choice, from_dict

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_SCALINGS = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

    ``head_dim`` 0 means ``width // heads``. ``kv_heads`` < ``heads`` is grouped-query attention.
    ``qk_norm``: an RMSNorm over each head's query and key (weights of size ``head_dim``, shared
    by the heads), after the projections and before the rotary embedding (Qwen3).
    Rotary scaling: ``default`` (none), ``linear`` (positions divided by ``rope_factor``) or
    ``llama3`` (Llama 3.1's frequency-dependent rescaling, with the low/high frequency factors
    and the original context length).
    """

    model_type: str = "llama"  # llama | qwen2 | qwen3: the Hugging Face class to export to
    vocab_size: int = 32000
    width: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 0
    mlp_dim: int = 1536
    act: str = "silu"
    norm_eps: float = 1e-5
    context_length: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # M-RoPE (Qwen2-VL): the rotary frequency pairs split into temporal / height / width
    # sections, each rotated by its own row of position_ids [3, B, L]; () = 1-D rotary.
    mrope_section: tuple[int, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        check_choice("decoder.model_type", self.model_type, MODEL_TYPES)
        check_choice("decoder.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.act != "silu":
            raise ConfigError(f"decoder.act = {self.act!r}: Llama/Qwen2 MLPs use 'silu'")
        for name in ("vocab_size", "width", "layers", "heads", "kv_heads", "mlp_dim",
                     "context_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"decoder.{name} must be > 0, got {getattr(self, name)!r}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.rope_factor <= 0:
            raise ConfigError("decoder.norm_eps, rope_theta and rope_factor must be > 0")
        if self.heads % self.kv_heads:
            raise ConfigError(f"decoder.heads ({self.heads}) must be a multiple of "
                              f"decoder.kv_heads ({self.kv_heads})")
        if self.head_dim == 0 and self.width % self.heads:
            raise ConfigError(f"decoder.width ({self.width}) is not divisible by decoder.heads "
                              f"({self.heads}); set decoder.head_dim")
        if self.attn_head_dim % 2:
            raise ConfigError(f"decoder head_dim {self.attn_head_dim} must be even (rotary "
                              f"embeddings rotate pairs)")
        llama3 = self.rope_scaling == "llama3"
        if llama3 and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError("decoder.rope_high_freq_factor must exceed rope_low_freq_factor")
        # JSON gives lists; keep a tuple so the config stays hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        object.__setattr__(self, "mrope_section", tuple(int(i) for i in self.mrope_section))
        pairs = self.attn_head_dim // 2
        if self.mrope_section and (len(self.mrope_section) != 3 or min(self.mrope_section) < 0
                                   or sum(self.mrope_section) != pairs):
            raise ConfigError(f"decoder.mrope_section {list(self.mrope_section)} must be three "
                              f"sizes (temporal, height, width) summing to head_dim / 2 = {pairs}")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.width // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build from a dict (e.g. imagefm.json), refusing unknown keys."""
        return from_dict(cls, dict(data), "decoder")

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


# Shapes of published models; "lm-tiny" is for CPU tests.
DECODER_PRESETS: dict[str, DecoderConfig] = {
    "lm-tiny": DecoderConfig(vocab_size=512, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128,
                             context_length=256, tie_embeddings=True),
    "smollm2-135m": DecoderConfig(vocab_size=49152, width=576, layers=30, heads=9, kv_heads=3,
                                  mlp_dim=1536, context_length=8192, rope_theta=100000.0,
                                  tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                                  pad_token_id=2),
    "qwen2-0.5b": DecoderConfig(model_type="qwen2", vocab_size=151936, width=896, layers=24,
                                heads=14, kv_heads=2, mlp_dim=4864, norm_eps=1e-6,
                                context_length=32768, rope_theta=1000000.0, qkv_bias=True,
                                tie_embeddings=True),
    "qwen3-0.6b": DecoderConfig(model_type="qwen3", vocab_size=151936, width=1024, layers=28,
                                heads=16, kv_heads=8, head_dim=128, mlp_dim=3072, norm_eps=1e-6,
                                context_length=40960, rope_theta=1000000.0, qk_norm=True,
                                tie_embeddings=True),
}


def decoder_preset(name: str, **overrides: Any) -> DecoderConfig:
    """A named decoder preset, optionally with fields replaced."""
    if name not in DECODER_PRESETS:
        raise ConfigError(f"unknown decoder preset {name!r}; choose one of "
                          f"{', '.join(sorted(DECODER_PRESETS))}")
    base = DECODER_PRESETS[name]
    return dataclasses.replace(base, **overrides) if overrides else base
