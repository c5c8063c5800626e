"""A Llama/Qwen2/Qwen3-family decoder language model with a preallocated KV cache.

    ids ─► embed_tokens ─► N × [x + attn(attn_norm(x)), x + mlp(mlp_norm(x))] ─► norm ─► lm_head
                              attn: q/k/v (+bias, +norm) ─► rotary ─► grouped-query SDPA ─► o_proj
                              mlp:  down(silu(gate(x)) * up(x))

The numerics follow Hugging Face's ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
``Qwen3ForCausalLM`` (RMSNorm in float32, rotate-half rotary layout, cos/sin tables in float32),
so converted checkpoints give the same logits (tests/test_decoder_parity.py, test_qwen3.py).
Qwen3's q/k norm (``config.qk_norm``) is that RMSNorm over each head, before the rotation.

A VLM feeds ``inputs_embeds`` instead of ``input_ids`` (image features spliced into the token
embeddings); everything else is unchanged.

Inference speed (CPU decode is dominated by per-op overhead and weight reads):
* the cache is preallocated for the whole generation; each step writes in place, no re-allocation;
* under ``torch.no_grad``/``inference_mode`` q/k/v and gate/up each run as one matmul on a
  concatenated weight, cached and rebuilt only when a weight changes. The weights themselves stay
  separate ``nn.Linear`` modules, so checkpoints, converters and LoRA target them by name;
* rotary embeddings rotate q and k together, from a cos/sin table computed once;
* attention goes through SDPA with native grouped-query support and no mask when none is needed;
* the linear layers may be :class:`~imagefm.models.quantized.QuantizedLinear` (GGUF Q4/Q8 blocks,
  ``load_gguf(path, keep_quantized=True)``): ~5x fewer bytes per decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.checkpoint import empty_parameters, has_meta_parameters, save_model
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.quantized import QuantizedLinear, describe_quantization
from imagefm.models.rotary import RotaryEmbedding, apply_rotary

IGNORE_INDEX = -100  # label value excluded from the loss (prompt, padding, image tokens)


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, L or logits_to_keep, vocab]
    loss: torch.Tensor | None = None  # next-token cross-entropy when labels were given
    cache: KVCache | None = None
    hidden_states: torch.Tensor | None = None  # final-norm output [B, L, width], on request


# --- pieces --------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back before the weight (as HF Llama)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class _FusedLinear:
    """One matmul for several ``nn.Linear`` that read the same input (q/k/v, gate/up).

    Used only in eval mode without autograd (training keeps no second copy of the weights); the
    concatenated weight is cached and rebuilt when any source weight is replaced or modified in
    place (tracked by data pointer and version counter).
    Modules that are not plain ``nn.Linear`` (e.g. LoRA wrappers) turn fusing off, so their
    extra computation is never skipped. :class:`QuantizedLinear` layers are always joined (they
    have no parameters to train): one kernel call, on their blocks laid back to back.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.quantized: QuantizedLinear | None = None

    def __call__(self, owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
        modules = [getattr(owner, name) for name in self.names]
        if all(type(m) is QuantizedLinear for m in modules):
            key = tuple(t.data_ptr() for m in modules for t in m._buffers.values()
                        if t is not None)
            if key != self.key or self.quantized is None:
                self.quantized, self.key = QuantizedLinear.concat(modules), key
            return self.quantized(x)
        unfused = (torch.is_grad_enabled() or owner.training
                   or any(type(m) is not nn.Linear for m in modules))
        if unfused:
            return torch.cat([m(x) for m in modules], dim=-1)
        tensors = [t for m in modules for t in (m.weight, m.bias) if t is not None]
        try:
            key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter: don't cache
            return torch.cat([m(x) for m in modules], dim=-1)
        if key != self.key:
            self.weight = torch.cat([m.weight for m in modules])
            biased = [m.bias is not None for m in modules]
            self.bias = None
            if any(biased):
                self.bias = torch.cat([m.bias if m.bias is not None else
                                       m.weight.new_zeros(m.out_features) for m in modules])
            self.key = key
        return F.linear(x, self.weight, self.bias)


# --- the KV cache --------------------------------------------------------------------------------

class KVCache:
    """Keys and values of every layer, preallocated: [layers, B, kv_heads, capacity, head_dim].

    ``length`` positions are filled. A forward pass writes its keys/values in place after them
    and attends over the filled prefix (a view, no copy).
    """

    def __init__(self, config: DecoderConfig, batch: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (config.layers, batch, config.kv_heads, capacity, config.attn_head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        # M-RoPE: per-row offset [B] of the positions the model derives for new tokens (a prompt
        # with images uses fewer positions than tokens); set with the prompt, kept while decoding.
        self.rope_deltas: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` [B, kv_heads, L, D] at ``length``; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# --- layers --------------------------------------------------------------------------------------

class DecoderAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; q/k/v/o named as in HF."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.head_dim = config.attn_head_dim
        width = config.width
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=config.o_bias)
        # Qwen3: RMSNorm over each head's query / key (one weight of head_dim for all heads).
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self._qkv = _FusedLinear(("q_proj", "k_proj", "v_proj"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        b, n, _ = x.shape
        h, kv = self.heads, self.kv_heads
        qkv = self._qkv(self, x).view(b, n, h + 2 * kv, self.head_dim)
        qk = qkv[:, :, : h + kv]
        if self.q_norm is not None:  # before the rotation, as Qwen3
            qk = torch.cat([self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])], dim=2)
        # q and k rotate together: one set of elementwise ops instead of two.
        qk = apply_rotary(qk, cos, sin)
        q = qk[:, :, :h].transpose(1, 2)
        k = qk[:, :, h:].transpose(1, 2)
        v = qkv[:, :, h + kv:].transpose(1, 2)
        rows = getattr(cache, "rows", None)
        if rows is not None:
            # Sequences of different lengths decoded together (models/batched_decode.py): each
            # row attends over its own cache by the very call it would make alone.
            out = torch.cat([self.attend(q[i:i + 1], *row.update(layer, k[i:i + 1], v[i:i + 1]),
                                         mask, is_causal) for i, row in enumerate(rows)])
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            out = self.attend(q, k, v, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """SDPA of q [B, heads, L, D] over k/v [B, kv_heads, keys, D]: [B, heads, L, D]."""
        b, h, n, _ = q.shape
        if n == 1 and h != self.kv_heads and not is_causal:
            # One new token (a decoding step): the query heads that share a key/value head are
            # that head's queries, so attention runs per KV head with no key repetition. On the
            # CPU SDPA's enable_gqa path costs 1.5x (float32) to 7x (bfloat16) more here.
            # A padding mask [B or 1, 1, 1, keys] broadcasts over the grouped queries.
            grouped = q.reshape(b, self.kv_heads, h // self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)
            return out.reshape(b, h, 1, self.head_dim)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              enable_gqa=h != self.kv_heads)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.width, config.mlp_dim, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.width, config.mlp_dim, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.mlp_dim, config.width, bias=config.mlp_bias)
        self._gate_up = _FusedLinear(("gate_proj", "up_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(self, x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderBlock(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.width, config.norm_eps)
        self.attn = DecoderAttention(config)
        self.mlp_norm = RMSNorm(config.width, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool, cache: KVCache | None,
                layer: int) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


def decoder_attention_mask(key_padding: torch.Tensor | None, past: int, query_len: int,
                           device: torch.device) -> torch.Tensor:
    """Boolean mask [B or 1, 1, L, past + L], True = may attend: causal with ``past`` cached
    positions in front, and padded keys (``key_padding`` [B, past + L], 0 = pad) hidden.

    Every query may always see itself, so a padding query never has an empty row (SDPA would
    return NaN there); what padding positions compute is never used.
    """
    total = past + query_len
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if key_padding is not None:
        mask = (mask & key_padding.bool()[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask


# --- the model -----------------------------------------------------------------------------------

class DecoderLM(nn.Module):
    """A causal language model of the Llama/Qwen2 family.

    ``lm(input_ids, attention_mask).logits`` gives [B, L, vocab]; ``lm.generate(...)`` continues
    prompts (see :mod:`imagefm.models.generation`). Loaders attach ``tokenizer`` (an
    :class:`imagefm.tokenizer.Tokenizer`) and ``chat_template`` (Jinja source, or None for
    ChatML) so a checkpoint is self-contained.
    """

    architecture = "decoder_lm"  # the name imagefm.json records (imagefm.loading maps it back)

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.width)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.width, config.norm_eps)
        # Tied: the output projection is the embedding matrix itself (no second parameter).
        self.lm_head = (None if config.tie_embeddings
                        else nn.Linear(config.width, config.vocab_size, bias=False))
        # A quantised copy of the tied embedding matrix for the output projection (see
        # imagefm.models.quantized); the embedding itself stays float for the input lookup.
        self.quantized_head: QuantizedLinear | None = None
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.tokenizer: Any = None
        self.chat_template: str | None = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """HF's initialisation: normal(0, 0.02) matrices and embeddings, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @classmethod
    def for_loading(cls, config: DecoderConfig, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> DecoderLM:
        """A model whose parameters are allocated but not initialised, for a loader that then
        fills every one of them (a strict load). Skips the random initialisation, which costs
        more than reading a small model's weights. Inside imagefm.load the parameters stay on
        the meta device and the loader assigns the checkpoint's tensors (no copy at all)."""
        with empty_parameters():
            model = cls(config)
        if has_meta_parameters(model):
            return model
        with torch.device("meta"):
            model = cls(config)
        return model.to_empty(device=device).to(dtype)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_meta(self) -> dict[str, Any]:
        """What imagefm.json records besides the config: a quantised model's layer counts."""
        quantization = describe_quantization(self)
        return {"quantization": quantization} if quantization is not None else {}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write an imagefm checkpoint (weights, config, tokenizer files, chat template)."""
        return save_model(self, directory)  # quantised layers are saved as their blocks

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` positions."""
        weight = self.embed_tokens.weight
        return KVCache(self.config, batch, capacity, dtype or weight.dtype,
                       device or weight.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
    ) -> DecoderOutput:
        """Logits for ``input_ids`` [B, L] (or ``inputs_embeds`` [B, L, width]).

        ``attention_mask`` [B, past + L] (1 = token, 0 = padding) covers the cached positions
        too, as in HF. Positions default to the running count of real tokens, so a left-padded
        row computes what the same row unpadded would, plus ``cache.rope_deltas`` when set;
        M-RoPE models may pass ``position_ids`` [3, B, L]. With ``cache`` the new keys/values are
        appended to it. ``logits_to_keep`` > 0 computes logits for the last that many positions
        only (generation needs one). ``labels`` [B, L] give the next-token loss (IGNORE_INDEX
        positions excluded).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        past = cache.length if cache is not None else 0
        if cache is not None and past + length > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {past} are used and "
                             f"{length} more do not fit")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, past + length):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                                 f"expected {(batch, past + length)} (cached + new positions)")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: the fast path computes the same
        # Positions we derive never exceed the sequence length so far.
        bound = past + length if position_ids is None else None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + length, device=x.device).expand(batch, -1)
            else:
                running = attention_mask.long().cumsum(-1) - 1
                position_ids = running.clamp(min=0)[:, past:]
            if cache is not None and cache.rope_deltas is not None:
                position_ids = position_ids + cache.rope_deltas.to(x.device)[:, None]
                bound = None
        mask, is_causal = None, False
        if attention_mask is not None:
            mask = decoder_attention_mask(attention_mask, past, length, x.device)
        elif length > 1:
            if past == 0:
                is_causal = True  # SDPA's own causal path: no mask tensor at all
            else:
                mask = decoder_attention_mask(None, past, length, x.device)
        cos, sin = self.rotary(position_ids, x.dtype, bound)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if checkpointing and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, is_causal, None,
                                                      index, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, is_causal, cache, index)
        if cache is not None:
            cache.length = past + length
        hidden = self.norm(x)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        logits = self.output_logits(kept)
        loss = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels need logits for every position (logits_to_keep=0)")
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
        return DecoderOutput(logits, loss, cache, hidden if output_hidden_states else None)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output projection of final-norm states [..., width]: logits [..., vocab]."""
        head = self.quantized_head if self.quantized_head is not None else self.lm_head
        return head(hidden) if head is not None else F.linear(hidden, self.embed_tokens.weight)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 do_sample: bool = False, **kwargs: Any) -> torch.Tensor:
        """Continue ``input_ids`` [B, L]; returns [B, L + new] token ids, prompt included.

        Keyword arguments are those of :func:`imagefm.models.generation.generate`
        (attention_mask, temperature, top_k, top_p, repetition_penalty, stop_strings, ...).
        """
        from imagefm.models.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        **kwargs)
