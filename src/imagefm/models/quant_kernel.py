"""The C kernel of the quantised linear layers (``imagefm.models.quantized``): its source, built
with the system compiler (``$CC``, default ``cc``) on first use into ``~/.cache/imagefm/kernels``
(``$IMAGEFM_CACHE`` moves it), and loaded with ctypes.

    kernel()            the loaded library, or None (no compiler, or the build failed)
    kernel_status()     (built?, why not)
    build_library(...)  compile, cache and load a C source (used by every kernel here)

Kept apart from the layers so that a reader of ``quantized.py`` sees the block formats and the
layer, and a reader of this file the C and how it is built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from imagefm.checkpoint import atomic_write

# --- the kernel ----------------------------------------------------------------------------------

KERNEL_SOURCE = r"""
#include <stdint.h>
#include <string.h>

typedef float v16f __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
/* bytes -> int32 -> float: converting bytes straight to float is not vectorised by GCC 12 */
#define TO_FLOAT(v) __builtin_convertvector(__builtin_convertvector((v), v16i), v16f)
#define ROWS 4 /* output rows per tile: independent accumulators, one x load for four rows */

static inline v16f load_f(const float *p) { v16f v; memcpy(&v, p, sizeof v); return v; }
static inline v16b load_b(const uint8_t *p) { v16b v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum(v16f v) { float s = 0; for (int j = 0; j < 16; j++) s += v[j]; return s; }

/* One tile: y[r] = sum_g d[r,g] * (x_g . q[r,g]) + m[r,g] * sum(x_g) for `rows` rows.
   int4 blocks: 16 bytes, the low nibbles are values 0..15, the high ones 16..31 (GGUF). */
static inline __attribute__((always_inline)) void int4_tile(
    const float *x, const uint8_t *q, const float *dm, float *y, int64_t G, int rows) {
  v16f acc[ROWS] = {0};
  for (int64_t g = 0; g < G; g++) {
    v16f x0 = load_f(x + 32 * g), x1 = load_f(x + 32 * g + 16), xs = x0 + x1;
    for (int r = 0; r < rows; r++) {
      v16b b = load_b(q + (r * G + g) * 16);
      const float *s = dm + 2 * (r * G + g);
      acc[r] += s[0] * (x0 * TO_FLOAT(b & 15) + x1 * TO_FLOAT(b >> 4)) + s[1] * xs;
    }
  }
  for (int r = 0; r < rows; r++) y[r] = hsum(acc[r]);
}

/* int8 blocks: 32 signed bytes; read as unsigned (q + 128) so the conversion vectorises. */
static inline __attribute__((always_inline)) void int8_tile(
    const float *x, const uint8_t *q, const float *d, float *y, int64_t G, int rows) {
  v16f acc[ROWS] = {0};
  for (int64_t g = 0; g < G; g++) {
    v16f x0 = load_f(x + 32 * g), x1 = load_f(x + 32 * g + 16);
    for (int r = 0; r < rows; r++) {
      const uint8_t *b = q + (r * G + g) * 32;
      v16f q0 = TO_FLOAT(load_b(b) ^ 0x80) - 128.0f, q1 = TO_FLOAT(load_b(b + 16) ^ 0x80) - 128.0f;
      acc[r] += d[r * G + g] * (x0 * q0 + x1 * q1);
    }
  }
  for (int r = 0; r < rows; r++) y[r] = hsum(acc[r]);
}

/* y[M, N] = x[M, K] @ W^T. int4: q [N, K/2] bytes, dm [N, K/32, 2] (d, m) float.
   int8: q [N, K] int8, d [N, K/32] float. Rows of W are split over `threads` OpenMP threads. */
void int4_matmul(const float *x, const uint8_t *q, const float *dm, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t G = K / 32, tiles = (N + ROWS - 1) / ROWS;
  #pragma omp parallel for if(threads > 1) num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t n = t * ROWS;
    const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
    const uint8_t *qt = q + n * G * 16;
    const float *st = dm + n * G * 2;
    for (int64_t i = 0; i < M; i++) {
      if (rows == ROWS) int4_tile(x + i * K, qt, st, y + i * N + n, G, ROWS);
      else int4_tile(x + i * K, qt, st, y + i * N + n, G, rows);
    }
  }
}

void int8_matmul(const float *x, const uint8_t *q, const float *d, float *y,
                 int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t G = K / 32, tiles = (N + ROWS - 1) / ROWS;
  #pragma omp parallel for if(threads > 1) num_threads(threads) schedule(static)
  for (int64_t t = 0; t < tiles; t++) {
    const int64_t n = t * ROWS;
    const int rows = N - n < ROWS ? (int)(N - n) : ROWS;
    const uint8_t *qt = q + n * G * 32;
    const float *st = d + n * G;
    for (int64_t i = 0; i < M; i++) {
      if (rows == ROWS) int8_tile(x + i * K, qt, st, y + i * N + n, G, ROWS);
      else int8_tile(x + i * K, qt, st, y + i * N + n, G, rows);
    }
  }
}

/* w[N, K] = the float weights (for prompts: dequantise once, then one BLAS matmul). */
void int4_dequantize(const uint8_t *q, const float *dm, float *w, int64_t N, int64_t K,
                     int threads) {
  const int64_t blocks = N * (K / 32);
  #pragma omp parallel for if(threads > 1) num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    v16b bytes = load_b(q + 16 * b);
    v16f lo = dm[2 * b] * TO_FLOAT(bytes & 15) + dm[2 * b + 1];
    v16f hi = dm[2 * b] * TO_FLOAT(bytes >> 4) + dm[2 * b + 1];
    memcpy(w + 32 * b, &lo, sizeof lo);
    memcpy(w + 32 * b + 16, &hi, sizeof hi);
  }
}

void int8_dequantize(const uint8_t *q, const float *d, float *w, int64_t N, int64_t K,
                     int threads) {
  const int64_t blocks = N * (K / 32);
  #pragma omp parallel for if(threads > 1) num_threads(threads) schedule(static)
  for (int64_t b = 0; b < blocks; b++) {
    v16f q0 = TO_FLOAT(load_b(q + 32 * b) ^ 0x80) - 128.0f;
    v16f q1 = TO_FLOAT(load_b(q + 32 * b + 16) ^ 0x80) - 128.0f;
    q0 *= d[b];
    q1 *= d[b];
    memcpy(w + 32 * b, &q0, sizeof q0);
    memcpy(w + 32 * b + 16, &q1, sizeof q1);
  }
}
"""

# Flag sets tried in order; the first that compiles and loads wins. (Whether ``d*q + m`` is
# contracted to one FMA does not matter: d*q is exact in float32.)
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-mcpu=native", "-fopenmp"],
    ["-O3", "-march=native"],
    ["-O3"],
)



def kernel_cache_dir() -> Path:
    """Where compiled kernels live: ``$IMAGEFM_CACHE/kernels`` or ``~/.cache/imagefm/kernels``."""
    root = os.environ.get("IMAGEFM_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imagefm" / "kernels"


def _cpu_signature() -> str:
    """-march=native builds for this CPU: the cache key includes its flags."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


class _CompileError(Exception):
    pass


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> None:
    command = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(target)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise _CompileError(str(err)) from None
    if done.returncode != 0:
        raise _CompileError((done.stderr.strip() or "failed")[-500:])


def _build_directory() -> Path:
    """The kernel cache, or (read-only home, say) a temporary folder for this process."""
    directory = kernel_cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="imagefm-kernels-"))


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("int4_matmul", "int8_matmul"):
        getattr(library, name).argtypes = [p, p, p, p, i64, i64, i64, i32]
        getattr(library, name).restype = None
    for name in ("int4_dequantize", "int8_dequantize"):
        getattr(library, name).argtypes = [p, p, p, i64, i64, i32]
        getattr(library, name).restype = None
    return library


def build_library(stem: str, source_text: str, bind: Callable[[ctypes.CDLL], ctypes.CDLL],
                  flag_sets: Sequence[Sequence[str]] = FLAG_SETS) -> ctypes.CDLL:
    """Compile C ``source_text`` into ``<cache>/<stem>-<hash>.so`` (the first of ``flag_sets``
    that compiles and loads; reused while source, compiler, flags and CPU are unchanged), load
    it and declare its functions with ``bind``. The one build mechanism of every C kernel here
    (this file's, and the fused decoding step's, ``imagefm.models.fused_kernel``).

    Raises RuntimeError (saying why) where no compiler exists or no flag set builds."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler {compiler!r} on PATH (install gcc or clang, or set CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot run {compiler!r}: {err}") from None
    directory = _build_directory()
    errors = []
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / f"{stem}.c"
        source.write_text(source_text)
        for flags in flag_sets:
            flags = list(flags)
            key = "\n".join([source_text, compiler, version, " ".join(flags), _cpu_signature()])
            target = directory / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
            try:
                if not target.is_file():  # written whole or not at all (parallel builds race)
                    atomic_write(target, lambda tmp, f=flags: _compile(compiler, f, source, tmp))
                return bind(ctypes.CDLL(str(target)))
            except (_CompileError, OSError) as err:
                errors.append(f"{compiler} {' '.join(flags)}: {err}")
    raise RuntimeError(f"could not build the {stem} kernel:\n" + "\n".join(errors))


def _build() -> ctypes.CDLL:
    return build_library("quantized", KERNEL_SOURCE, _bind)


class LazyLibrary:
    """A C library built on its first use, once (thread-safe), remembering why it could not
    be: every kernel here is one of these."""

    def __init__(self, build: Callable[[], ctypes.CDLL]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self.library: ctypes.CDLL | None = None
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if self.library is None and self.error is None:
            with self._lock:
                if self.library is None and self.error is None:
                    try:
                        self.library = self._build()
                    except RuntimeError as err:
                        self.error = str(err)
        return self.library


_KERNEL = LazyLibrary(_build)


def kernel() -> ctypes.CDLL | None:
    """The compiled kernel library (built on the first call), or None where it cannot be."""
    return _KERNEL.get()


def kernel_status() -> tuple[bool, str]:
    """(available, detail): builds the kernel if needed and says why it is missing."""
    library = kernel()
    return (True, "built") if library is not None else (False, _KERNEL.error or "unknown")
