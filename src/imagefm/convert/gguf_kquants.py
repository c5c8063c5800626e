"""ggml's Q4_K blocks, written here (``gguf.quants`` reads them but cannot write them).

    quantize_q4_k(weight)   float [rows, 256 * k] -> uint8 [rows, 144 * k]

A Q4_K block (ggml-common.h ``block_q4_K``) holds 256 values in 144 bytes: fp16 ``d``, fp16
``dmin``, 12 bytes packing eight 6-bit sub-block scales and eight 6-bit mins (sub-blocks of 32),
then 128 bytes of 4-bit values; value = d * scale[j] * q - dmin * min[j]. The 4-bit values go in
four chunks of 32 bytes, chunk c's low nibbles for sub-block 2c and high nibbles for 2c + 1: the
layout :func:`imagefm.convert.gguf._q4_k` reads (and ``_k_scales`` unpacks the 6-bit scales).

Each sub-block's scale and min come from the search llama.cpp's reference quantiser makes
(``make_qkx2_quants`` in ggml-quants.c, facts re-implemented here over all blocks at once): start
from the min/max grid, then try 21 slightly different grid steps, for each one re-fit scale and
min by weighted least squares on the rounded values, and keep the lowest weighted squared error.
The weights favour large values (``rms(sub-block) + |x|``), as llama.cpp's do without an
importance matrix. The eight scales and mins are then put on a 6-bit grid under one fp16 ``d`` /
``dmin`` per block, and the 4-bit values rounded again against those final numbers. Done in
float32 in llama.cpp's order of operations, the bytes equal ggml's ``quantize_row_q4_K_ref``
(tests/test_gguf_kquants.py calls that through llama-cpp-python's libggml where installed).
Speed: ~0.1 µs a value on one core, ~1.6x ggml's C reference.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per Q4_K block
SUB = 32  # values per sub-block (8 per block)
Q4_K_BYTES = 144
_CHUNK = 4096  # blocks quantised at a time (memory: ~60 bytes a value while searching)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over the first axis (the 32 values of each sub-block), [1, m]. numpy adds the rows
    of a C-contiguous array one after the other: ggml's loop order, to the bit (a pairwise
    sum rounds differently, which now and then moves a 6-bit scale by one)."""
    return a.sum(axis=0, keepdims=True)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0,
                   rdelta: float = 0.1, nstep: int = 20
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale and min (the value subtracted, >= 0) [m] of each column of ``x`` [32, m] (a
    sub-block) for values ``scale * q - min`` with q in 0..nmax, minimising the ``w``-weighted
    squared error; and the q of that fit [32, m] (kept where the final scale comes out zero, as
    llama.cpp keeps them). Columns, so that every step runs over all sub-blocks at once."""
    low = np.minimum(x.min(0, keepdims=True), 0)  # the grid always reaches zero
    high = x.max(0, keepdims=True)
    flat = high <= low
    sum_w = _sum(w)
    sum_x = _sum(w * x)

    def error(scale: np.ndarray, offset: np.ndarray, q: np.ndarray) -> np.ndarray:
        return _sum(w * np.square(scale * q + offset - x))

    def grid(offset: np.ndarray, steps: np.float32) -> np.ndarray:
        span = high - offset
        inverse = steps / np.where(span > 0, span, 1)
        return np.clip(np.rint(inverse * (x - offset)), 0, nmax)

    steps = np.float32(nmax)
    best_scale = 1 / (steps / np.where(high > low, high - low, 1))
    best_offset = low  # value = scale * q + offset, offset <= 0
    best_q = grid(low, steps)
    best_error = error(best_scale, best_offset, best_q)
    for step in range(nstep + 1):
        # As llama.cpp does, each try starts from the best offset found so far.
        steps = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        q = grid(best_offset, steps)
        sum_l = _sum(w * q)
        sum_l2 = _sum(w * q * q)
        sum_xl = _sum(w * q * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = offset > 0  # a positive offset would need a negative min: fit scale alone
        scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), scale)
        offset = np.where(positive, 0, offset)
        err = error(scale, offset, q)
        better = ok & (err < best_error)
        best_scale = np.where(better, scale, best_scale)
        best_offset = np.where(better, offset, best_offset)
        best_error = np.where(better, err, best_error)
        best_q = np.where(better, q, best_q)
    best_scale = np.where(flat, 0, best_scale)  # all equal: the min alone holds them
    best_q = np.where(flat, 0, best_q)
    return best_scale[0], 0.0 - best_offset[0], best_q  # never -0.0, as C keeps it


def _pack_scales(scale: np.ndarray, minimum: np.ndarray) -> np.ndarray:
    """Six-bit scales and mins [n, 8] (0..63) -> the 12 bytes of ggml's packing [n, 12]:
    bytes 0-3 / 4-7 hold scales / mins 0-3 in their low 6 bits and the top 2 bits of scales /
    mins 4-7 above them; bytes 8-11 hold the low 4 bits of scales 4-7 and (high nibble) mins 4-7."""
    sc, m = scale.astype(np.uint8), minimum.astype(np.uint8)
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return packed


def _quantize_blocks(x: np.ndarray) -> np.ndarray:
    """Float32 blocks [n, 256] -> Q4_K bytes [n, 144]."""
    n = x.shape[0]
    sub = x.reshape(n, 8, SUB)
    columns = np.ascontiguousarray(x.reshape(n * 8, SUB).T)  # [32, sub-blocks]
    rms = np.sqrt(_sum(np.square(columns)) / SUB)
    scales, mins, fitted = _fit_scale_min(columns, rms + np.abs(columns))
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    fitted = fitted.T.reshape(n, 8, SUB)
    scales = np.maximum(scales, 0)  # a least-squares fit of noise may come out negative
    max_scale = scales.max(-1, keepdims=True)
    max_min = mins.max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, 63 / max_scale, 0)
        inv_min = np.where(max_min > 0, 63 / max_min, 0)
    ls = np.clip(np.rint(scales * inv_scale), 0, 63)
    lm = np.clip(np.rint(mins * inv_min), 0, 63)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    # The 4-bit values, rounded against the numbers the file will really hold (where those
    # make a sub-block's step zero, its values are 0 whatever q: keep the fit's, as ggml does).
    step = (d.astype(np.float32) * ls)[..., None]
    offset = (dmin.astype(np.float32) * lm)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint((sub + offset) / np.where(step > 0, step, 1)), fitted)
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(n, 4, 2, SUB)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales(ls, lm),
                           nibbles], axis=1)


def quantize_q4_k(weight: np.ndarray) -> np.ndarray:
    """A float matrix [rows, cols] as Q4_K bytes [rows, cols / 256 * 144], each row its own
    blocks (as GGUF stores a matrix). Raises ValueError when cols is not a multiple of 256."""
    weight = np.asarray(weight, dtype=np.float32)
    if weight.ndim != 2 or weight.shape[1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values; got shape "
                         f"{tuple(weight.shape)}")
    rows, cols = weight.shape
    blocks = weight.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], Q4_K_BYTES), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK):
        out[start:start + _CHUNK] = _quantize_blocks(blocks[start:start + _CHUNK])
    return out.reshape(rows, cols // QK_K * Q4_K_BYTES)
