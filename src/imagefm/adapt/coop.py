"""CoOp: prompt learning with learned context vectors in the text tower.

Zhou et al., "Learning to Prompt for Vision-Language Models" (IJCV 2022). The words of a prompt
("a photo of a") are replaced by ``M`` free vectors in the text tower's token-embedding space,
shared by all classes:

    [BOS] v₁ v₂ … v_M  <class name pieces> <rest of the template> [EOS]

Only the vectors train (cross-entropy of the zero-shot logits on the few-shot images); every
weight of the model stays as it was. They enter through a forward hook on the text tower's
token-embedding table (``model.text.token_embed``), which replaces the looked-up embeddings at
the placeholder slots: no change to the tower's code, and it works for every text tower that
has such a table (ours, BERT). They start from the embeddings of the template's words
before ``{}`` (the language's first template: ``a photo of a {}.``), so step 0 is a one-template
zero-shot classifier; a template with nothing before the name (Korean ``{}의 사진``) starts
from ``n_ctx`` small random vectors and keeps its words after the name.

Image features are cached, so a step runs only the text tower, on one prompt per class. The
number of steps is chosen on validation data: the context with the best validation accuracy
seen every ``eval_every`` steps is kept (early stopping; the loop is
:func:`imagefm.train.fit.fit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imagefm.adapt.features import FeatureViews
from imagefm.adapt.head import Head, accuracy, text_head
from imagefm.adapt.tune import adamw_settings
from imagefm.apps.zeroshot import logit_parts, model_device
from imagefm.eval.templates import PLACEHOLDER, load_templates
from imagefm.train.fit import fit
from imagefm.train.optim import build_optimizer


@dataclass(frozen=True)
class CoopConfig:
    n_ctx: int = 4  # used when the template has no words before the class name
    template: str = ""  # "" = the first shipped template of the language
    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 256
    eval_every: int = 25
    seed: int = 0


def _build_ids(tokenizer: Any, classnames: Sequence[str], template: str, n_ctx: int
               ) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """``input_ids``/``attention_mask`` ``[C, L]`` with placeholder slots for the context, the
    ids of the template's words the context starts from (empty: random start), and the slot
    offset."""
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"a CoOp template needs exactly one '{{}}', got {template!r}")
    prefix, suffix = (part for part in template.split(PLACEHOLDER))
    prefix = prefix.rstrip()
    init_ids = tokenizer.pieces(prefix) if prefix else []
    slots = len(init_ids) or n_ctx
    # Any ordinary token fills the slots (its embedding is replaced); it must not be EOS, nor
    # larger than EOS for argmax pooling: the first piece of a letter is neither.
    filler = init_ids[0] if init_ids else tokenizer.pieces("x")[0]
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    room = tokenizer.context_length - len(head) - slots - len(tail)
    if room < 1:
        raise ValueError(f"{slots} context vectors leave no room for the class name in "
                         f"{tokenizer.context_length} tokens")
    rows = []
    for name in classnames:
        text = (prefix + " " if prefix else "") + name + suffix
        pieces = tokenizer.pieces(text)
        if init_ids and pieces[:len(init_ids)] == init_ids:
            rest = pieces[len(init_ids):]
        else:  # the tokenizer merged across the boundary: tokenize the rest on its own
            rest = tokenizer.pieces((" " if prefix else "") + name + suffix)
        rows.append(head + [filler] * slots + rest[:room] + tail)
    length = tokenizer.context_length if tokenizer.settings().get("padding") == "max_length" \
        else max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return input_ids, mask, init_ids, len(head)


def token_embedding(model: Any) -> nn.Embedding:
    """The text tower's token-embedding table (our transformer and BERT both call it
    ``token_embed``)."""
    table = getattr(getattr(model, "text", None), "token_embed", None)
    if not isinstance(table, nn.Embedding):
        raise ValueError("CoOp needs a text tower with a token-embedding table "
                         "(model.text.token_embed)")
    return table


class PromptLearner(nn.Module):
    """Learned context vectors and the class prompts they are inserted into."""

    def __init__(self, model: Any, tokenizer: Any, classnames: Sequence[str], template: str,
                 n_ctx: int = 4, seed: int = 0) -> None:
        super().__init__()
        input_ids, mask, init_ids, start = _build_ids(tokenizer, classnames, template, n_ctx)
        embedding = token_embedding(model).weight
        if init_ids:
            ctx = embedding[torch.tensor(init_ids, device=embedding.device)].detach().clone()
        else:
            generator = torch.Generator().manual_seed(seed)
            ctx = torch.randn(n_ctx, embedding.shape[1], generator=generator).to(
                embedding.device) * 0.02
        self.ctx = nn.Parameter(ctx.float())
        self.start = start
        self.register_buffer("input_ids", input_ids.to(embedding.device), persistent=False)
        self.register_buffer("attention_mask", mask.to(embedding.device), persistent=False)

    def class_embeddings(self, model: Any) -> torch.Tensor:
        """Normalised class embeddings ``[C, D]`` with the current context (differentiable)."""

        def insert(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            # The lookup's output with the context vectors at the placeholder slots.
            ctx = self.ctx.to(output.dtype).expand(output.shape[0], -1, -1)
            end = self.start + ctx.shape[1]
            return torch.cat([output[:, :self.start], ctx, output[:, end:]], dim=1)

        handle = token_embedding(model).register_forward_hook(insert)
        try:
            embeds = model.encode_text(self.input_ids, self.attention_mask)
        finally:
            handle.remove()
        return F.normalize(embeds.float(), dim=-1)


def train_coop(model: Any, tokenizer: Any, classnames: Sequence[str], train: FeatureViews,
               val: FeatureViews, config: CoopConfig | None = None, lang: str = "en"
               ) -> tuple[Head, dict[str, Any]]:
    """Learn the context on ``train``; return the head of the best validation context."""
    config = config or CoopConfig()
    if len(train) == 0:
        raise ValueError("CoOp needs at least one training example")
    template = config.template or load_templates(lang)[0]
    learner = PromptLearner(model, tokenizer, classnames, template, config.n_ctx, config.seed)
    scale, bias = logit_parts(model)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    initial = learner.ctx.detach().clone().cpu()
    # No warm-up and no clipping: a cosine from ``lr`` to zero over the steps.
    optim = adamw_settings(config.lr, 0.0, grad_clip=0.0)
    optimizer = build_optimizer(learner, optim, {"ctx": 1.0})
    generator = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    x, y = train.post.to(device), train.labels.to(device)
    last: dict[str, torch.Tensor] = {}

    def evaluate() -> float:
        last["ctx"] = learner.ctx.detach().clone()  # the final evaluation sees the final ctx
        embeds = learner.class_embeddings(model).cpu()
        return accuracy(text_head(embeds, scale, bias).logits(val.post), val.labels)

    def loss(step: int) -> torch.Tensor:
        rows = torch.randperm(len(train), generator=generator)[:config.batch_size]
        logits = scale * x[rows] @ learner.class_embeddings(model).t() + bias
        return F.cross_entropy(logits, y[rows.to(device)])

    try:
        result = fit(optimizer, optim, config.steps, loss, evaluate=evaluate,
                     eval_every=config.eval_every, desc="coop")
        with torch.no_grad():  # the context is back at its best value
            best_embeds = learner.class_embeddings(model).cpu()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(frozen[name])
        model.train(was_training)
    return text_head(best_embeds, scale, bias), {
        "template": template, "n_ctx": int(learner.ctx.shape[0]), "best_step": result.best_step,
        "val_accuracy": result.best_score, "history": result.history,
        "trainable_parameters": learner.ctx.numel(), "initial_context": initial,
        "context": learner.ctx.detach().cpu(), "final_context": last["ctx"].cpu()}
