"""Text transformer: tokens + positions → pre-LN blocks → final norm → one pooled vector.

CLIP: causal mask, pooled at the end-of-text token (the largest id, "argmax", or a given id).
SigLIP: bidirectional, pooled at the last position (its tokenizer pads every text to full length).
"""

from __future__ import annotations

import torch
from torch import nn

from imagefm.config import TextConfig
from imagefm.models.layers import Transformer, init_transformer, make_attention_mask, text_columns


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.randn(c.context_length, c.width) * 0.01)
        self.transformer = Transformer(c.width, c.layers, c.heads, c.mlp_dim, c.act, c.norm_eps)
        self.norm_final = nn.LayerNorm(c.width, eps=c.norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        init_transformer(self.transformer, c.width, c.layers)

    def forward_tokens(self, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens after the final norm: [B, L, width]."""
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"text of {length} tokens is longer than the model's context length "
                             f"{self.config.context_length}; tokenize with truncation")
        x = self.token_embed(input_ids) + self.pos_embed[:length].to(self.token_embed.weight.dtype)
        c = self.config
        padding = attention_mask if c.use_padding_mask else None
        if c.causal and c.pool in ("argmax", "eos"):
            # Under a causal mask the EOS token never sees the padding after it, so the pooled
            # output is the same with or without the padding mask; the pure causal kernel is faster.
            # (Outputs at padding positions differ from HF's last_hidden_state; nothing reads them.)
            padding = None
        if c.causal and padding is None:
            x = self.transformer(x, is_causal=True)
        else:
            x = self.transformer(x, make_attention_mask(length, padding, causal=c.causal,
                                                        device=x.device))
        return self.norm_final(x)

    def needed_length(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> int:
        """How many leading columns decide the pooled output: up to the last column that is text
        in some row, when padding cannot reach the pooled token (causal or masked attention, not
        pooled at the last position); else all of them. Inference cuts the rest (a CLIP query of
        8 tokens then costs 8 positions, not 77); training keeps static shapes."""
        c, full = self.config, input_ids.shape[1]
        if attention_mask is None or c.pool == "last" or not (c.causal or c.use_padding_mask):
            return full
        length = text_columns(attention_mask)
        if c.pool == "argmax" and int(input_ids.argmax(dim=-1).max()) >= length:
            return full  # a padding id above the EOS id would be what argmax pools
        return length

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        pool = self.config.pool
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        if pool == "argmax":
            return tokens[rows, input_ids.argmax(dim=-1)]
        if pool == "eos":
            # First occurrence of the EOS id (argmax over bool is not supported on every device).
            is_eos = (input_ids == self.config.eos_token_id).int()
            return tokens[rows, is_eos.argmax(dim=-1)]
        if pool == "last":
            return tokens[:, -1]
        return tokens[:, 0]

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled text features [B, width] (before the dual encoder's projection)."""
        return self.pool(self.forward_tokens(input_ids, attention_mask), input_ids)
