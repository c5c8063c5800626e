"""One decoding step of a quantised :class:`~imagefm.models.decoder.DecoderLM` in one C call.

    decoder = fused_decoder(lm)              # None where the step cannot run fused (below)
    logits = decoder.step(tokens, caches)    # [B, vocab]: token b into caches[b], one each
    logits = decoder.step_batch(tokens, cache, padding)  # the B rows of one (padded) cache
    why_not_fused(lm)                        # None, or why the PyTorch path is taken

``generate_tokens`` (every batch, left padding included) and continuous batching's
``decode_step`` use it for quantised models; ``ENABLED = False`` turns it off.

Why: a step of SmolLM2-135M through PyTorch is ~40 small operations a layer (norms, rotary,
views, SDPA, adds) around the 7 matrix products, 30 layers deep: their dispatch costs as much
as the products themselves. Here every layer runs in C (``imagefm.models.fused_kernel``): the
products as llama.cpp computes them on a CPU (the input vector quantised to int8 blocks once
per product, integer dot products with the weight blocks: AVX-512 VNNI / AVX2 / portable C,
chosen when the C is compiled), OpenMP over output rows with ``torch.get_num_threads()``
threads, attention over the model's own :class:`~imagefm.models.decoder.KVCache` (written in
place, so a PyTorch prefill hands over to it and back without a copy). Rotary cos/sin come from
the model's own table (``lm.rotary``): scaling rules and M-RoPE offsets stay in one place.

Numbers: the int8 input rounding moves logits away from the float arithmetic of the PyTorch
path as llama.cpp's rounding does (SmolLM2, one step: largest difference ~0.4 on logits whose
standard deviation is ~2.4; llama.cpp's from our float path ~0.5-0.7). Greedy tokens agreed
with both on the prompts measured (docs/benchmarks.md); tests/test_fused_decode.py checks the
step against the PyTorch path with the same rounding. A sequence's numbers depend neither on
the thread count nor on the other sequences of a batched step (each output row is computed
whole by one thread), so continuous batching (:mod:`imagefm.models.batched_decode`) still gives
a sequence exactly its tokens alone, and a left-padded row of ``generate`` its tokens alone.

Runs fused: a DecoderLM in float32 on the CPU whose every block linear is a plain
:class:`~imagefm.models.quantized.QuantizedLinear` (4- or 8-bit blocks), with a quantised or a
float32 output head, SiLU MLPs, no module hooks. Anything else (float or LoRA layers, other
dtypes or devices, no compiler) keeps the PyTorch path: ``why_not_fused(lm)`` says why.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from imagefm.models.decoder import DecoderLM, KVCache, RMSNorm
from imagefm.models.fused_kernel import (
    Cache,
    Layer,
    Mat,
    Model,
    fused_kernel,
    fused_kernel_status,
)
from imagefm.models.quantized import QuantizedLinear

ENABLED = True  # False sends every step through PyTorch (benchmarks compare the two paths)
_LINEARS = (("attn", "q_proj", "q"), ("attn", "k_proj", "k"), ("attn", "v_proj", "v"),
            ("attn", "o_proj", "o"), ("mlp", "gate_proj", "gate"), ("mlp", "up_proj", "up"),
            ("mlp", "down_proj", "down"))


class _NotFused(Exception):
    pass


def half_scales(linear: QuantizedLinear) -> torch.Tensor:
    """The layer's block scales as float16, what the C reads (20 bytes a Q4_1 block, as in the
    GGUF file, instead of 24): exact, since every quantiser here rounds scales to float16."""
    scales = _float(linear.scales, "scales")
    half = scales.half()
    if not torch.equal(half.float(), scales):
        raise _NotFused("block scales that are not float16 values")
    return half.contiguous()


def _float(t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise _NotFused(f"{what} is {t.dtype} on {t.device.type}, not float32 on the CPU")
    return t.detach().contiguous()


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class FusedDecoder:
    """The C view of one model: pointers to its weights (no copies, except to make a tensor
    contiguous), checked once when built. ``step`` runs one decoding step."""

    def __init__(self, model: DecoderLM) -> None:
        config = model.config
        if config.act != "silu":
            raise _NotFused(f"activation {config.act!r} (the fused step has SiLU)")
        if config.heads % config.kv_heads or config.attn_head_dim % 2:
            raise _NotFused("heads not a multiple of kv_heads, or an odd head_dim")
        if len(model.blocks) != config.layers:
            raise _NotFused(f"{len(model.blocks)} blocks for a config of {config.layers} layers")
        if any(_hooked(m) for m in model.modules()):
            raise _NotFused("a module has forward hooks (they would not run)")
        self.rotary = model.rotary  # (no reference to the model: it keys a weak dictionary)
        self.tensors: list[torch.Tensor] = []  # kept alive while the C reads them
        self.watched: list[tuple[weakref.ref, str, object]] = []  # what must stay in place
        embed = self._keep(_float(model.embed_tokens.weight, "the embedding"))
        layers = (Layer * config.layers)()
        self.watched += [(weakref.ref(model), "embed_tokens", model.embed_tokens),
                         (weakref.ref(model), "blocks", model.blocks)]
        for index, block in enumerate(model.blocks):
            layer = layers[index]
            self.watched += [(weakref.ref(model.blocks), str(index), block),
                             (weakref.ref(block), "attn", block.attn),
                             (weakref.ref(block), "mlp", block.mlp)]
            layer.attn_norm = self._norm(block, "attn_norm")
            layer.mlp_norm = self._norm(block, "mlp_norm")
            layer.q_norm = self._norm(block.attn, "q_norm")
            layer.k_norm = self._norm(block.attn, "k_norm")
            for part, name, field in _LINEARS:
                owner = getattr(block, part)
                linear = getattr(owner, name)
                if type(linear) is not QuantizedLinear:
                    raise _NotFused(f"blocks.{index}.{part}.{name} is a "
                                    f"{type(linear).__name__}, not a QuantizedLinear")
                self.watched.append((weakref.ref(owner), name, linear))
                setattr(layer, field, self._matrix(linear))
        self.layers = layers
        head = model.quantized_head if model.quantized_head is not None else model.lm_head
        self.watched += [(weakref.ref(model), "quantized_head", model.quantized_head),
                         (weakref.ref(model), "lm_head", model.lm_head),
                         (weakref.ref(model.embed_tokens), "weight", model.embed_tokens.weight)]
        if head is None:
            head_matrix = self._float_matrix(model.embed_tokens.weight, None)
        elif type(head) is QuantizedLinear:
            head_matrix = self._matrix(head)
        elif type(head) is nn.Linear:
            head_matrix = self._float_matrix(head.weight, head.bias)
        else:
            raise _NotFused(f"the output head is a {type(head).__name__}")
        self.tokens = model.embed_tokens.weight.shape[0]  # rows of the input lookup
        self.spec = Model(layers=config.layers, width=config.width, heads=config.heads,
                          kv_heads=config.kv_heads, head_dim=config.attn_head_dim,
                          mlp_dim=config.mlp_dim, vocab=head_matrix.n,
                          eps=config.norm_eps, embed=embed.data_ptr(),
                          norm=self._norm(model, "norm"), layer=layers, head=head_matrix)
        self.pointers = [t.data_ptr() for t in self.tensors]

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        self.tensors.append(tensor)
        return tensor

    def _norm(self, owner: nn.Module, name: str) -> int | None:
        norm = getattr(owner, name)
        if norm is None:
            return None
        if type(norm) is not RMSNorm:
            raise _NotFused(f"{name} is a {type(norm).__name__}, not an RMSNorm")
        self.watched.append((weakref.ref(owner), name, norm))
        return self._keep(_float(norm.weight, name)).data_ptr()

    def _matrix(self, linear: QuantizedLinear) -> Mat:
        if linear.qweight.device.type != "cpu":
            raise _NotFused("quantised weights off the CPU")
        qweight = self._keep(linear.qweight.contiguous())
        scales = self._keep(half_scales(linear))
        bias = _float(linear.bias, "a bias")
        return Mat(q=qweight.data_ptr(), s=scales.data_ptr(),
                   bias=None if bias is None else self._keep(bias).data_ptr(),
                   n=linear.out_features, k=linear.in_features, type=linear.bits)

    def _float_matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Mat:
        weight = self._keep(_float(weight, "the output head"))
        bias = _float(bias, "the head's bias")
        return Mat(q=weight.data_ptr(), s=None,
                   bias=None if bias is None else self._keep(bias).data_ptr(),
                   n=weight.shape[0], k=weight.shape[1], type=0)

    def current(self) -> bool:
        """Whether the model still holds the modules and weights this view points at (checked
        before each batched step: kept to dictionary look-ups)."""
        for owner, name, held in self.watched:
            module = owner()
            if module is None or _attribute(module, name) is not held:
                return False
        return [t.data_ptr() for t in self.tensors] == self.pointers

    def step(self, tokens: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        """Logits [B, vocab] of the next token after ``tokens`` [B]: token b is written at
        position ``caches[b].length`` of its own cache (one sequence each), which then grows
        by one."""
        rows = (Cache * len(caches))()
        positions = []
        for i, cache in enumerate(caches):
            if cache.keys.shape[1] != 1:
                raise ValueError("step() takes one cache per sequence; step_batch() a batch's")
            self._row(rows[i], cache, 0, 0)
            positions.append(cache.length + _delta(cache, 0))
        logits = self._run(tokens, rows, positions)
        for cache in caches:
            cache.length += 1
        return logits

    def step_batch(self, tokens: torch.Tensor, cache: KVCache,
                   padding: Sequence[int] | None = None) -> torch.Tensor:
        """As :meth:`step` for the B sequences of one cache [layers, B, ...], row b left-padded
        by ``padding[b]`` positions (not attended to; positions count the real tokens only, as
        :meth:`DecoderLM.forward` derives them from the attention mask)."""
        batch = cache.keys.shape[1]
        padding = list(padding) if padding is not None else [0] * batch
        rows = (Cache * batch)()
        positions = []
        for b in range(batch):
            self._row(rows[b], cache, b, padding[b])
            positions.append(cache.length - padding[b] + _delta(cache, b))
        logits = self._run(tokens, rows, positions)
        cache.length += 1
        return logits

    @staticmethod
    def _row(row: Cache, cache: KVCache, index: int, start: int) -> None:
        keys, values = cache.keys, cache.values
        if (keys.dtype != torch.float32 or keys.device.type != "cpu" or not keys.is_contiguous()
                or cache.length >= cache.capacity):
            raise ValueError("the fused step takes float32 CPU caches with room for the new "
                             "token")
        offset = index * keys.stride(1) * keys.element_size()
        row.keys, row.values = keys.data_ptr() + offset, values.data_ptr() + offset
        row.capacity, row.length = cache.capacity, cache.length
        row.stride, row.start = keys.stride(0), start

    def _run(self, tokens: torch.Tensor, rows: ctypes.Array, positions: list[int]
             ) -> torch.Tensor:
        position_ids = torch.tensor(positions)[:, None]
        cos, sin = self.rotary(position_ids, torch.float32, max(positions) + 1)
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        if not 0 <= int(tokens.min()) <= int(tokens.max()) < self.tokens:
            raise ValueError(f"token ids must be in [0, {self.tokens}), got {tokens.tolist()}")
        logits = torch.empty(len(positions), self.spec.vocab)
        fused_kernel().fused_decode_step(
            ctypes.byref(self.spec), len(positions), tokens.data_ptr(), rows,
            cos.contiguous().data_ptr(), sin.contiguous().data_ptr(), logits.data_ptr(),
            torch.get_num_threads())
        return logits


def _attribute(module: nn.Module, name: str) -> object:
    """``getattr(module, name, None)`` without nn.Module's slow ``__getattr__``."""
    attributes = module.__dict__
    for table in ("_modules", "_parameters", "_buffers"):
        if name in attributes[table]:
            return attributes[table][name]
    return attributes.get(name)


def _delta(cache: KVCache, row: int) -> int:
    """The M-RoPE offset of ``row``'s new positions (0 without one)."""
    deltas = cache.rope_deltas
    if deltas is None:
        return 0
    deltas = deltas.reshape(-1)
    return int(deltas[row if deltas.numel() > 1 else 0])


# The parts of a step that ``kernel_profile`` reports, in the C's order (fused_kernel.py).
PROFILE_PARTS = ("norms, residuals, input rounding", "q/k/v products",
                 "q/k norm, rotary, cache write", "attention", "o product",
                 "gate/up products", "SiLU * up", "down product", "output head")


def kernel_profile(collect: bool) -> dict[str, float]:
    """Seconds spent in each part of the fused steps run since the last ``collect=True`` call
    (which starts collecting from zero; ``False`` stops). For benchmarks: timing costs ~1%."""
    library = fused_kernel()
    if library is None:
        return {}
    sums = (ctypes.c_double * len(PROFILE_PARTS))()
    library.fused_profile(1 if collect else 0, sums)
    return dict(zip(PROFILE_PARTS, sums, strict=True))


def why_not_fused(model: object) -> str | None:
    """None when ``model``'s decoding steps can run fused, else the reason they cannot."""
    if not ENABLED:
        return "fused decoding is switched off (imagefm.models.fused_decode.ENABLED)"
    if not isinstance(model, DecoderLM):
        return f"a {type(model).__name__} is not a DecoderLM"
    if fused_kernel() is None:

        return f"the fused kernel is unavailable: {fused_kernel_status()[1]}"
    try:
        _cached(model)
    except _NotFused as err:
        return str(err)
    return None


# Built views, by model: building one walks every layer; checking it is current is cheaper.
_views: weakref.WeakKeyDictionary[DecoderLM, FusedDecoder] = weakref.WeakKeyDictionary()


def _cached(model: DecoderLM) -> FusedDecoder:
    held = _views.get(model)
    if held is None or not held.current():
        held = FusedDecoder(model)
        _views[model] = held
    return held


def fused_decoder(model: object) -> FusedDecoder | None:
    """The fused step for ``model`` (kept on the model and rebuilt when its layers or weights
    are replaced), or None where it cannot run fused (:func:`why_not_fused`)."""
    if (not ENABLED or not isinstance(model, DecoderLM) or not len(model.blocks)
            or type(model.blocks[0].attn.q_proj) is not QuantizedLinear  # (no build for floats)
            or fused_kernel() is None):
        return None
    try:
        return _cached(model)
    except _NotFused:
        return None
