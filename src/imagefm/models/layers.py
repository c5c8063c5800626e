"""Building blocks shared by every tower: attention, MLP, pre-LN block, masks.

Attention goes through ``attend``: ``F.scaled_dot_product_attention`` with an explicit boolean mask
(``True`` = may attend) built by ``make_attention_mask``, the one primitive for every mask kind,
except on the CPU with short sequences (see ``attend``).
Projection names (q_proj/k_proj/v_proj/o_proj, fc1/fc2) match Hugging Face so that converters and
LoRA ``target_modules`` work across families.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many keys, plain matmul-softmax-matmul attention is faster on the CPU than PyTorch's
# fused kernel, whose backward is slow for short sequences (measured on 2 cores, bf16: training
# 2.9x at 65 keys and 6.3x at 32, about even at 197-257; inference 1.3-3x at 65, 2x slower at
# 197). The rule depends on the shape only, never on grad mode, so a no-grad pass and a training
# pass compute bit-identical values (GradCache relies on it).
CPU_MATH_ATTENTION_MAX_KEYS = 128


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v over [B, H, L, D] tensors, as SDPA computes it."""
    if not (q.device.type == "cpu" and k.shape[-2] <= CPU_MATH_ATTENTION_MAX_KEYS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:  # top-left aligned, as SDPA; with a mask too, both must allow
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else (mask & causal if mask.dtype == torch.bool
                                            else mask.masked_fill(~causal, float("-inf")))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    # Softmax in float32 even under bf16 autocast, as the fused kernels do.
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI's CLIP checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The activation module for a config name."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}")


def make_attention_mask(
    query_len: int,
    key_padding: torch.Tensor | None = None,
    *,
    causal: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, Lq, Lk] where True means "may attend", or None for full attention.

    ``key_padding`` is an attention mask as tokenizers return it ([B, Lk], 1 = real token).
    """
    mask = None
    if causal:
        mask = torch.ones(query_len, query_len, dtype=torch.bool, device=device).tril()
        mask = mask[None, None]
    if key_padding is not None:
        keep = key_padding.bool()[:, None, None, :]
        mask = keep if mask is None else mask & keep
    return mask


def text_columns(attention_mask: torch.Tensor) -> int:
    """1 + the last column that is a real token in some row (the full width if none is): the
    columns after it are padding in every row."""
    used = attention_mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else attention_mask.shape[1]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (all with bias)."""

    def __init__(self, width: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.o_proj = nn.Linear(width, width, bias=bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Self-attention over x, or cross-attention from x to ``context`` when given."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if context is None and all(type(p) is nn.Linear for p in projections):
            # One fused matmul for q, k and v is markedly faster on CPU than three; the weights
            # stay separate modules so checkpoints and LoRA target q_proj/k_proj/v_proj by name.
            # Only for plain Linear layers: a wrapped one (a peft LoRA layer) must run its own
            # forward, or its update would be silently skipped.
            weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            bias = None
            if self.q_proj.bias is not None:
                bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
        else:
            source = x if context is None else context
            q, k, v = self.q_proj(x), self.k_proj(source), self.v_proj(source)
        q, k, v = self._split(q), self._split(k), self._split(v)
        out = attend(q, k, v, mask, is_causal)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks with optional activation checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str,
                 norm_eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_dim, act, norm_eps) for _ in range(layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, blocks: int | None = None) -> torch.Tensor:
        """``is_causal`` is a faster spelling of a pure causal ``mask`` (then pass mask=None).
        ``blocks`` runs only the first that many blocks (None: all)."""
        for block in self.blocks[:blocks]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, is_causal,
                                                      use_reentrant=False)
            else:
                x = block(x, mask, is_causal)
        return x


def init_transformer(module: nn.Module, width: int, layers: int) -> None:
    """CLIP-style initialisation: small normal weights, output projections scaled by depth."""
    attn_std = width**-0.5
    proj_std = attn_std * (2 * layers) ** -0.5
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue
        if name.endswith(("o_proj.weight", "fc2.weight")):
            nn.init.normal_(p, std=proj_std)
        elif name.endswith("fc1.weight"):
            nn.init.normal_(p, std=(2 * width) ** -0.5)
        else:
            nn.init.normal_(p, std=attn_std)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def interpolate_grid(pos: torch.Tensor, new_grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square grid of position embeddings [N, D] to ``new_grid`` (bicubic, as HF)."""
    n, dim = pos.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid")
    if (side, side) == tuple(new_grid):
        return pos
    grid = pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(-1, dim)
