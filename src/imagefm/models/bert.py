"""BERT text encoder (as Hugging Face ``BertModel``), pooled to one sentence vector.

    tokens + positions + token types → LayerNorm → N post-LN layers → pool (mean, [CLS] or
    BERT's pooler: tanh(dense([CLS])))
    layer: x = norm1(x + attn(x));  x = norm2(x + mlp(x))     (attention over real tokens only)

RoBERTa / XLM-RoBERTa are the same network; only their position ids differ
(``positions = "roberta"``: counted from ``pad_token_id + 1`` over the non-pad tokens).

Names follow the rest of imagefm (q_proj/k_proj/v_proj/o_proj, fc1/fc2, ``layers.N``), so LoRA
targets and ``stage.unlock_last_n`` work as for our own towers. No dropout: the pretrained
sentence encoders are fine-tuned here on small data with frozen or slowly trained layers.
"""

from __future__ import annotations

import torch
from torch import nn

from imagefm.config import BertConfig
from imagefm.models.layers import MLP, Attention, make_attention_mask, text_columns


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(c.width, c.heads)
        self.norm1 = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = MLP(c.width, c.mlp_dim, c.act)
        self.norm2 = nn.LayerNorm(c.width, eps=c.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.mlp(x))


class BertEncoder(nn.Module):
    """``forward(input_ids, attention_mask) -> [B, width]``; ``forward_tokens`` gives all tokens."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c = self.config = config
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Embedding(c.max_positions, c.width)
        self.type_embed = nn.Embedding(c.type_vocab_size, c.width)
        self.embed_norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.layers))
        # BERT's pooler (HF pooler_output); only a tower that pools with it has one.
        self.pooler = nn.Linear(c.width, c.width) if c.pool == "pooler" else None
        self.gradient_checkpointing = False
        for module in self.modules():  # BERT's initialisation (used when not loading weights)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def text_mask(self, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask the tower applies: as given, or from the pad id (``padding_mask``)."""
        if self.config.padding_mask == "pad_id":
            return input_ids.ne(self.config.pad_token_id).long()
        return attention_mask

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] (or [L]) position ids: 0..L-1, or RoBERTa's count over non-pad tokens."""
        if self.config.positions == "roberta":
            real = input_ids.ne(self.config.pad_token_id).long()
            return torch.cumsum(real, dim=1) * real + self.config.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's output [B, L, width] (HF ``last_hidden_state``)."""
        length = input_ids.shape[1]
        if length > self.config.max_text_length:
            raise ValueError(f"text of {length} tokens is longer than the model's "
                             f"{self.config.max_text_length} positions; tokenize with truncation")
        attention_mask = self.text_mask(input_ids, attention_mask)
        positions = self.position_ids(input_ids)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = self.token_embed(input_ids) + self.pos_embed(positions) + self.type_embed(types)
        x = self.embed_norm(x)
        mask = make_attention_mask(length, attention_mask, device=x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def needed_length(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> int:
        """Columns up to the last one that is text in some row: padding is masked out of
        attention and of the mean, so the rest can be cut (see ``TextTransformer``)."""
        attention_mask = self.text_mask(input_ids, attention_mask)
        return input_ids.shape[1] if attention_mask is None else text_columns(attention_mask)

    def pool(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.pool == "first":
            return tokens[:, 0]
        if self.pooler is not None:
            return torch.tanh(self.pooler(tokens[:, 0]))
        if attention_mask is None:
            return tokens.mean(dim=1)
        # sentence-transformers: the mean over real tokens ([CLS] and [SEP] included).
        weights = attention_mask.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled sentence features [B, width] (before the dual encoder's projection)."""
        attention_mask = self.text_mask(input_ids, attention_mask)
        return self.pool(self.forward_tokens(input_ids, attention_mask), attention_mask)
