"""Weight-only quantised linear layers for fast CPU decoding: llama.cpp's Q4_0, Q4_1 and Q8_0
blocks kept as stored and multiplied by a small C kernel, compiled on first use.

    QuantizedLinear.from_gguf(raw, "Q4_1", shape)   a GGUF tensor's blocks, bit for bit
    QuantizedLinear.from_float(weight, "q4_1")      llama.cpp's rounding of float weights (lossy)
    quantize_decoder(model, "q4_1")                 every linear layer of a DecoderLM + its head
    dequantize_decoder(model)                       back to float layers holding the same weights
    install_quantized(model, state)                 quantised layers where a saved state has blocks
    kernel_status()                                 whether the kernel is built, and if not why

Why: one decoding step at batch 1 reads every weight once, so its speed is set by how many bytes
the weights take. SmolLM2-135M reads 538 MB per token in float32, 112 MB like this (4-bit blocks
for the layers, 8-bit for the output head).

The blocks hold 32 consecutive weights of a row with one float16 scale ``d`` (and for Q4_1 a
minimum ``m``): Q4_1 ``w = d*q + m`` with q in 0..15; Q4_0 ``w = d*(q - 8)``, stored here as
Q4_1 with ``m = -8d`` (the same numbers: both products are exact in float32); Q8_0 ``w = d*q``
with q in -128..127. The kernel computes ``y = sum over blocks of d*(x.q) + m*sum(x)`` in
float32: the weights are exactly those of the dequantised float32 matrix, only the order of the
float32 additions differs from ``x @ W.T`` (tests/test_quantized.py bounds the difference).

The kernel (``imagefm.models.quant_kernel``) is plain C (GCC/Clang vector extensions, OpenMP over
output rows), built with the system compiler (``$CC``, default ``cc``) into
``~/.cache/imagefm/kernels`` (``$IMAGEFM_CACHE`` moves it) and loaded with ctypes. Without a
compiler, or off the CPU, or when a gradient is needed, a layer multiplies by its dequantised
weight instead: the same numbers, no speed-up.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imagefm.models import quant_kernel
from imagefm.models.quant_kernel import kernel, kernel_status

if TYPE_CHECKING:
    from imagefm.models.decoder import DecoderLM

BLOCK = 32  # weights per block in every format handled here
FORMATS = ("q4_0", "q4_1", "q8_0")  # what from_float produces
GGUF_TYPES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}  # GGUF types kept as blocks
# Above this many input rows (a prompt, not a decoding step) the layer dequantises its weight
# once and lets the BLAS multiply: the kernel re-unpacks the blocks for every row.
KERNEL_MAX_ROWS = 8
# A decoding step of many sequences at once ([B, 1, in], continuous batching) stays on the kernel
# up to this many rows: as fast as dequantising up to ~32 rows, and each row's result is the one
# it gets alone (the kernel computes every row the same way), so batching changes no token.
KERNEL_MAX_DECODE_ROWS = 32

# --- blocks ---------------------------------------------------------------------------------------

def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf (llama.cpp's Q8_0 rounding); torch.round rounds half to even."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Values [n, 32] in 0..15 -> bytes [n, 16]: value j in the low nibble, j + 16 in the high."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def quantize_blocks(weight: torch.Tensor, kind: str
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantise rows [N, K] as llama.cpp does (gguf.quants gives the same blocks).

    Returns (values, d, m): int4 bytes [N, K/2] or int8 [N, K], and float16 scales d and
    (Q4_1) minima m, [N, K/32] each.
    """
    rows, cols = weight.shape
    blocks = weight.detach().float().cpu().reshape(-1, BLOCK)
    if kind == "q4_1":
        low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (high - low) / 15
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc((blocks - low) * inverse + 0.5).clamp(0, 15)
        return (_pack_nibbles(q).reshape(rows, cols // 2), d.half().reshape(rows, -1),
                low.half().reshape(rows, -1))
    if kind == "q4_0":
        peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        d = peak / -8
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = torch.trunc(blocks * inverse + 8.5).clamp(0, 15)
        return _pack_nibbles(q).reshape(rows, cols // 2), d.half().reshape(rows, -1), None
    if kind == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_half_away(blocks * inverse).to(torch.int8)
        return q.reshape(rows, cols), d.half().reshape(rows, -1), None
    raise ValueError(f"unknown quantisation {kind!r}; choose one of {', '.join(FORMATS)}")


def _gguf_parts(raw: np.ndarray, type_name: str, shape: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF Q4_0/Q4_1/Q8_0 tensor's bytes -> (values, d, m) as :func:`quantize_blocks`."""
    rows, cols = (int(s) for s in shape)
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if cols % BLOCK or data.size != rows * cols // BLOCK * size:
        raise ValueError(f"{type_name} data of {data.size} bytes does not hold {tuple(shape)}")
    blocks = torch.from_numpy(data.copy()).reshape(rows, cols // BLOCK, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0]
    if type_name == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0]
        return blocks[..., 4:].reshape(rows, cols // 2), d, m
    if type_name == "Q4_0":
        return blocks[..., 2:].reshape(rows, cols // 2), d, None
    return blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols), d, None


# --- the layer ------------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """``nn.Linear`` with weights in blocks of 32: 4-bit (``bits=4``: ``w = d*q + m``) or 8-bit
    (``bits=8``: ``w = d*q``). For inference: the blocks are buffers, not parameters.

    ``qweight``: uint8 [out, in/2] (4-bit, GGUF nibble order) or int8 [out, in] (8-bit);
    ``scales``: float32 [out, in/32, 2] (d, m) or [out, in/32] (d), the float16 values of the
    file widened exactly. ``bias`` (optional) follows the model's dtype.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        out_features = qweight.shape[0]
        in_features = qweight.shape[1] * (2 if bits == 4 else 1)
        expected = (out_features, in_features // BLOCK) + ((2,) if bits == 4 else ())
        if bits not in (4, 8) or in_features % BLOCK or tuple(scales.shape) != expected:
            raise ValueError(f"{bits}-bit blocks {tuple(qweight.shape)} with scales "
                             f"{tuple(scales.shape)} do not describe a matrix (expected scales "
                             f"{expected}, input width a multiple of {BLOCK})")
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("bias", bias)

    # -- construction

    @classmethod
    def from_parts(cls, values: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None,
                   bits: int, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """From block values and float16 scales; 4-bit without minima is Q4_0 (m = -8d)."""
        d = d.float()
        if bits == 4:
            m = -8 * d if m is None else m.float()
            scales = torch.stack([d, m], dim=-1)
        else:
            scales = d
        return cls(values.contiguous(), scales.contiguous(), bits, bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, kind: str = "q4_1",
                   bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Quantise a float weight [out, in] (in a multiple of 32) as llama.cpp would."""
        if weight.dim() != 2 or weight.shape[1] % BLOCK:
            raise ValueError(f"cannot quantise a weight of shape {tuple(weight.shape)} in "
                             f"blocks of {BLOCK} (the input width must be a multiple of {BLOCK})")
        values, d, m = quantize_blocks(weight, kind)
        return cls.from_parts(values, d, m, 8 if kind == "q8_0" else 4, bias)

    @classmethod
    def from_gguf(cls, raw: np.ndarray, type_name: str, shape: Sequence[int],
                  bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A GGUF tensor (``Q4_0``, ``Q4_1`` or ``Q8_0``, our [out, in] shape) as stored."""
        if type_name not in GGUF_TYPES:
            raise ValueError(f"GGUF type {type_name} is not kept quantised (only "
                             f"{', '.join(GGUF_TYPES)})")
        values, d, m = _gguf_parts(raw, type_name, shape)
        return cls.from_parts(values, d, m, 8 if type_name == "Q8_0" else 4, bias)

    @classmethod
    def concat(cls, layers: Sequence[QuantizedLinear]) -> QuantizedLinear:
        """One layer computing ``cat([layer(x) for layer in layers], -1)`` (q/k/v, gate/up).

        Layers that are consecutive row slices of one tensor (as :func:`quantize_decoder` makes
        them) are joined without a copy."""
        first = layers[0]
        if any(layer.bits != first.bits or layer.in_features != first.in_features
               for layer in layers):
            raise ValueError("only layers of one format and input width can be joined")
        biased = [layer.bias is not None for layer in layers]
        bias = None
        if any(biased):
            bias = torch.cat([layer.bias if layer.bias is not None
                              else first.scales.new_zeros(layer.out_features)
                              for layer in layers])
        return cls(_join([layer.qweight for layer in layers]),
                   _join([layer.scales for layer in layers]), first.bits, bias)

    def split(self, sizes: Sequence[int]) -> list[QuantizedLinear]:
        """Layers for consecutive groups of output rows, sharing this layer's memory."""
        values = self.qweight.split(list(sizes))
        scales = self.scales.split(list(sizes))
        biases = self.bias.split(list(sizes)) if self.bias is not None else [None] * len(sizes)
        return [QuantizedLinear(v, s, self.bits, b)
                for v, s, b in zip(values, scales, biases, strict=True)]

    # -- use

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight [out, in] (a new tensor each time)."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weights [out, in]: ``d*q + m`` (4-bit) or ``d*q`` (8-bit) in float32."""
        library = kernel() if self.qweight.device.type == "cpu" else None
        if library is not None:
            out = torch.empty(self.out_features, self.in_features)
            fn = library.int4_dequantize if self.bits == 4 else library.int8_dequantize
            fn(self.qweight.data_ptr(), self.scales.data_ptr(), out.data_ptr(),
               self.out_features, self.in_features, torch.get_num_threads())
            return out.to(dtype)
        rows, groups = self.out_features, self.in_features // BLOCK
        if self.bits == 4:
            packed = self.qweight.view(rows, groups, 16)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
            w = q * self.scales[..., :1] + self.scales[..., 1:]
        else:
            w = self.qweight.view(rows, groups, BLOCK).float() * self.scales[..., None]
        return w.reshape(rows, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decoding step calls this ~120 times for a 30-layer model: the fast path is kept to
        # a few cheap calls (buffers read once from _buffers, no copies for float32 input).
        buffers = self._buffers
        qweight, scales, bias = buffers["qweight"], buffers["scales"], buffers["bias"]
        # The built library read straight from its module: a decoding step calls this for
        # every layer, and the already-built case should cost one attribute read.
        built = quant_kernel._KERNEL.library
        library = built if built is not None else kernel()
        rows = x.numel() // self.in_features
        limit = KERNEL_MAX_DECODE_ROWS if x.dim() == 3 and x.shape[1] == 1 else KERNEL_MAX_ROWS
        if (library is None or rows > limit or x.device.type != "cpu"
                or (x.requires_grad and torch.is_grad_enabled())):
            # prompts, gradients, other devices: the same weights through F.linear
            y = F.linear(x, self.dequantize(x.dtype))
        else:
            flat = x if x.dtype == torch.float32 and x.is_contiguous() else \
                x.float().contiguous()
            y = torch.empty(x.shape[:-1] + (self.out_features,))
            matmul = library.int4_matmul if self.bits == 4 else library.int8_matmul
            matmul(flat.data_ptr(), qweight.data_ptr(), scales.data_ptr(), y.data_ptr(),
                   rows, self.out_features, self.in_features, torch.get_num_threads())
            if x.dtype != torch.float32:
                y = y.to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        # ``model.to(bfloat16)`` / ``.half()`` would round the float32 scales (the exact float16
        # values of the file, widened): they move between devices but keep their dtype.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes a multiplication reads: blocks and scales (and bias)."""
        tensors = [self.qweight, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, bias={self.bias is not None}")


def _join(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0; a view when the tensors already lie back to back."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    consecutive = all(t.is_contiguous() for t in tensors)
    for t in tensors:
        consecutive = consecutive and (t.untyped_storage().data_ptr() == storage
                                       and t.storage_offset() == offset)
        offset += t.numel()
    if not consecutive:
        return torch.cat(list(tensors))
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.as_strided(shape, first.stride())


# --- whole models ---------------------------------------------------------------------------------

LINEAR_NAMES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "mlp": ("gate_proj", "up_proj", "down_proj")}
FUSED = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def replace_linears(model: DecoderLM, layers: dict[str, QuantizedLinear],
                    head: QuantizedLinear | None = None) -> DecoderLM:
    """Put quantised layers in place of ``model``'s linears (names as in ``named_modules``,
    e.g. ``blocks.0.attn.q_proj``), and ``head`` as the output projection (of a tied model:
    the embedding matrix stays for the input lookup). Layers that one matmul reads together
    (q/k/v, gate/up) are laid out back to back so they run as one kernel call."""
    for name, layer in layers.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        current = getattr(owner, attr)
        if not isinstance(current, nn.Linear) and not isinstance(current, QuantizedLinear):
            raise ValueError(f"{name} is a {type(current).__name__}, not a linear layer")
        if (layer.out_features, layer.in_features) != (current.out_features,
                                                       current.in_features):
            raise ValueError(f"{name}: quantised layer is {layer.out_features}x"
                             f"{layer.in_features}, the model's {current.out_features}x"
                             f"{current.in_features}")
        setattr(owner, attr, layer)
    for block in model.blocks:
        for part, names in FUSED.items():
            owner = getattr(block, part)
            group = [getattr(owner, n) for n in names]
            if all(isinstance(m, QuantizedLinear) for m in group) and \
                    len({(m.bits, m.in_features) for m in group}) == 1:
                joined = QuantizedLinear.concat(group)  # one copy, then views of it
                for n, view in zip(names, joined.split([m.out_features for m in group]),
                                   strict=True):
                    setattr(owner, n, view)
    if head is not None:
        if model.lm_head is not None:
            model.lm_head = head
        else:
            expected = tuple(model.embed_tokens.weight.shape)
            if (head.out_features, head.in_features) != expected:
                raise ValueError(f"output head {head.out_features}x{head.in_features} does not "
                                 f"match the embedding {expected}")
            model.quantized_head = head
    return model


def quantize_decoder(model: DecoderLM, kind: str = "q4_1", head: str | None = "q8_0"
                     ) -> DecoderLM:
    """Quantise every linear layer of ``model`` in place (``kind``: q4_0, q4_1 or q8_0, rounded
    as llama.cpp does) and the output projection as ``head`` (None keeps it float).

    Lossy for float weights; a GGUF file's own blocks load exactly with
    ``load_gguf(path, keep_quantized=True)``. Warns and leaves the model as it is where the
    kernel cannot be built (quantised layers would then be no faster).
    """
    for name in (kind, head):
        if name is not None and name not in FORMATS:
            raise ValueError(f"unknown quantisation {name!r}; choose one of {', '.join(FORMATS)}")
    available, why = kernel_status()
    if not available:
        warnings.warn(f"quantised matmul kernel unavailable, keeping float weights: {why}",
                      stacklevel=2)
        return model
    layers = {}
    for index, block in enumerate(model.blocks):
        for part, names in LINEAR_NAMES.items():
            for n in names:
                linear = getattr(getattr(block, part), n)
                if isinstance(linear, nn.Linear):
                    layers[f"blocks.{index}.{part}.{n}"] = QuantizedLinear.from_float(
                        linear.weight, kind, linear.bias.detach() if linear.bias is not None
                        else None)
    output = None
    if head is not None:
        output = QuantizedLinear.from_float(model.output_weight, head)
        if model.lm_head is None:
            # Tied: lookup and output read one matrix (as in a GGUF file). Rounding the
            # embedding to the head's values keeps it one matrix, so the model still has one
            # set of weights (dequantize_decoder gives them back as a tied float model).
            with torch.no_grad():
                weight = model.embed_tokens.weight
                weight.copy_(output.dequantize(weight.dtype).to(weight.device))
    return replace_linears(model, layers, output)


def dequantize_decoder(model: DecoderLM) -> DecoderLM:
    """Replace every quantised layer of ``model`` (in place) by an ``nn.Linear`` holding its
    dequantised weights: a float model with exactly the same weights — to train it, export it,
    or run it where the kernel cannot be built."""
    dtype = model.embed_tokens.weight.dtype
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear) or name == "quantized_head":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        linear = nn.Linear(module.in_features, module.out_features,
                           bias=module.bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(module.dequantize(dtype))
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        setattr(owner, attr, linear.to(module.qweight.device))
    head = model.quantized_head
    if head is not None:
        if not torch.equal(head.dequantize(dtype).to(model.embed_tokens.weight.device),
                           model.embed_tokens.weight.detach()):
            raise ValueError("the quantised output head is not the embedding matrix's values: "
                             "a tied float model cannot hold both")
        model.quantized_head = None
    return model


def _decoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every DecoderLM in ``model``: itself, or a VLM's ``lm``."""
    from imagefm.models.decoder import DecoderLM

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DecoderLM)]


def install_quantized(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put quantised layers where a saved state dict holds blocks (``<layer>.qweight``), in
    every DecoderLM inside ``model`` (itself, or a VLM's ``lm``), so that the state loads into
    a freshly built model (then :func:`use_float_without_kernel`)."""
    suffix = ".qweight"
    for prefix, decoder in _decoders(model):
        start = f"{prefix}." if prefix else ""
        layers: dict[str, QuantizedLinear] = {}
        head = None
        for key, qweight in state.items():
            if not (key.startswith(start) and key.endswith(suffix)):
                continue
            name = key[len(start):-len(suffix)]
            stem = key[:-len(suffix)]
            layer = QuantizedLinear(qweight, state[f"{stem}.scales"],
                                    8 if qweight.dtype == torch.int8 else 4,
                                    state.get(f"{stem}.bias"))
            if name in ("quantized_head", "lm_head"):
                head = layer
            else:
                layers[name] = layer
        if not layers and head is None:
            continue
        replace_linears(decoder, layers, head)


def use_float_without_kernel(model: nn.Module) -> None:
    """Where the kernel cannot be built, dequantise the quantised layers of every DecoderLM in
    ``model`` (the same weights as float layers: blocks would be multiplied by dequantising
    them on every call), with a warning saying why."""
    available, why = kernel_status()
    if available or not is_quantized(model):
        return
    warnings.warn(f"quantised matmul kernel unavailable, using the float weights of the "
                  f"quantised checkpoint: {why}", stacklevel=2)
    for _, decoder in _decoders(model):
        dequantize_decoder(decoder)


def quantize_model(model: nn.Module, kind: str = "q8_0", head: str | None = "q8_0"
                   ) -> nn.Module:
    """:func:`quantize_decoder` for every DecoderLM in ``model``: a language model, or a VLM's
    LM (its vision tower and projector run once per image and stay float). In place. Q8_0 by
    default, as ``imagefm quantize``: 4-bit blocks can break a fine-tuned model
    (docs/results.md), so measure before shipping them."""
    decoders = _decoders(model)
    if not decoders:
        raise ValueError(f"a {type(model).__name__} has no language model to quantise")
    for _, decoder in decoders:
        quantize_decoder(decoder, kind, head)
    return model


def decode_weight_bytes(model: nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of the matrices one decoding step of a DecoderLM reads (blocks for quantised
    layers; the embedding lookup reads one row, but a tied head reads all of it), or with
    ``float_bytes`` what they would take as floats of that size."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += (module.out_features * module.in_features * float_bytes if float_bytes
                      else module.nbytes)
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * (float_bytes or module.weight.element_size())
    if getattr(model, "quantized_head", None) is None and getattr(model, "lm_head", 0) is None:
        weight = model.embed_tokens.weight
        total += weight.numel() * (float_bytes or weight.element_size())
    return total


def describe_quantization(model: nn.Module) -> dict[str, int] | None:
    """How many layers hold 4-bit and 8-bit blocks (None for a float model): recorded in a
    checkpoint's imagefm.json for people reading it."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        return None
    return {"4-bit layers": sum(m.bits == 4 for m in layers),
            "8-bit layers": sum(m.bits == 8 for m in layers)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())
