"""Our Q4_K quantiser (imagefm.convert.gguf_kquants), checked against three references:

* the block layout decoded by hand here (ggml-common.h ``block_q4_K``, get_scale_min_k4);
* both Q4_K readers, ``gguf.quants.dequantize`` (llama.cpp's Python package) and our own
  ``imagefm.convert.gguf.dequantize``: the same values, to the bit;
* ggml's own ``quantize_row_q4_K_ref`` in the libggml that llama-cpp-python ships (skipped
  where it is not installed): the same bytes.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from imagefm.convert.gguf import dequantize  # noqa: E402
from imagefm.convert.gguf_kquants import Q4_K_BYTES, QK_K, quantize_q4_k  # noqa: E402

Q4_K = gguf.GGMLQuantizationType.Q4_K


def _awkward(rows: int = 12, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Gaussian rows, and blocks that catch edge cases: all zero, constant (positive and
    negative), all positive, one outlier, a sub-block of zeros inside a live block, tiny values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[1, :256] = 0
    x[2, :256] = 0.75
    x[3, :256] = -0.4
    x[4] = np.abs(x[4]) + 1
    x[5, 7] = 40.0
    x[6, 32:64] = 0
    x[7] *= 1e-6
    return x


def _by_hand(block: np.ndarray) -> np.ndarray:
    """One 144-byte Q4_K block decoded as ggml's dequantize_row_q4_K reads it, loop by loop."""
    d, dmin = block[0:4].view(np.float16).astype(np.float32)
    packed = block[4:16]
    values = []
    for j in range(8):
        if j < 4:
            sc, m = packed[j] & 63, packed[j + 4] & 63
        else:
            sc = (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4)
            m = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4)
        chunk = block[16 + 32 * (j // 2): 16 + 32 * (j // 2 + 1)]
        q = chunk & 0x0F if j % 2 == 0 else chunk >> 4
        values.append(d * np.float32(sc) * q.astype(np.float32) - dmin * np.float32(m))
    return np.concatenate(values)


def test_layout_by_hand_and_both_readers_agree_to_the_bit() -> None:
    x = _awkward()
    data = quantize_q4_k(x)
    assert data.dtype == np.uint8 and data.shape == (12, 512 // QK_K * Q4_K_BYTES)
    theirs = gguf.quants.dequantize(data, Q4_K)
    ours = dequantize(data, "Q4_K", x.shape).numpy()
    assert theirs.shape == x.shape
    assert np.array_equal(theirs, ours)
    blocks = data.reshape(-1, Q4_K_BYTES)
    by_hand = np.stack([_by_hand(b) for b in blocks]).reshape(x.shape)
    assert np.array_equal(by_hand, ours)


def test_reconstruction_error_bounded_and_below_q4_0_q4_1() -> None:
    x = _awkward()
    values = dequantize(quantize_q4_k(x), "Q4_K", x.shape).numpy()
    assert np.all(values[1, :256] == 0)  # zeros stay zero
    assert np.allclose(values[2, :256], 0.75, rtol=1e-3)  # a constant block, by its scales
    assert np.allclose(values[3, :256], -0.4, rtol=1e-3)  # a negative constant, by its min
    assert np.all(values[6, 32:64] == values[6, 32])  # a sub-block of zeros: one value
    assert abs(values[6, 32]) <= 0.1
    # each value within about one 4-bit step of its sub-block's range (6-bit scales and fp16
    # rounding included). Not row 7: at 1e-6, d = max scale / 63 is below fp16's smallest
    # number and the block collapses, in ggml's reference quantiser as here (same bytes).
    live = np.delete(np.arange(len(x)), 7)
    sub = x[live].reshape(-1, 32)
    step = (sub.max(1) - np.minimum(sub.min(1), 0)) / 15
    err = np.abs(values[live] - x[live]).reshape(-1, 32)
    assert np.all(err <= 0.9 * step[:, None] + 1e-3 * np.abs(sub))
    gaussian = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)

    def rel(kind: str) -> float:
        data = (quantize_q4_k(gaussian) if kind == "Q4_K" else
                gguf.quants.quantize(gaussian, gguf.GGMLQuantizationType[kind]))
        back = dequantize(data, kind, gaussian.shape).numpy()
        return float(np.sqrt(np.mean((back - gaussian) ** 2) / np.mean(gaussian ** 2)))

    q4_k, q4_1, q4_0 = rel("Q4_K"), rel("Q4_1"), rel("Q4_0")
    assert q4_k < q4_1 < q4_0  # the same 4.5 bits a value as Q4_0, less error than Q4_1's 5
    assert q4_k < 0.075


def test_rows_not_in_blocks_of_256_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros((4, 288), dtype=np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q4_k(np.zeros(256, dtype=np.float32))


def _libggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama-cpp-python is not installed (it ships libggml)")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("lib/libggml-base.so*"))
    if not found:
        pytest.skip("libggml-base not found in llama_cpp/lib")
    lib = ctypes.CDLL(str(found[0]))
    lib.quantize_row_q4_K_ref.restype = None
    lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def test_bytes_equal_ggml_reference_quantiser() -> None:
    """ggml's quantize_row_q4_K_ref (what llama-quantize does without an importance matrix)."""
    lib = _libggml()
    x = np.ascontiguousarray(np.concatenate([_awkward(seed=2), 0.02 * _awkward(seed=3)]))
    ours = quantize_q4_k(x)
    theirs = np.zeros_like(ours)
    lib.quantize_row_q4_K_ref(x.ctypes.data, theirs.ctypes.data, x.size)
    assert np.array_equal(ours, theirs)
