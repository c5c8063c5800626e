"""The C of the fused decoding step (``imagefm.models.fused_decode``): every layer of one token
(or of one token for each of B sequences) in one call, with llama.cpp's arithmetic for the
matrix-vector products: the input vector is quantised once per product to int8 blocks of 32
(scale ``d`` and ``d * sum(q)``), and each weight block's dot product with it is an integer sum
(``imagefm.models.fused_dots``: AVX-512 VNNI, AVX2 or portable C, chosen at compile time).

    fused_kernel()           the loaded library, or None (no compiler, or the build failed)
    fused_kernel_status()    (built?, which instructions / why not)
    FUSED_SOURCE             the C (DOTS_SOURCE + STEP_SOURCE); built by
                             ``quant_kernel.build_library`` (one build mechanism for all kernels)

Weights: 4-bit blocks ``w = d*q + m`` (Q4_1, and Q4_0 stored with m = -8d), 8-bit ``w = d*q``
(Q8_0), as :class:`~imagefm.models.quantized.QuantizedLinear` holds them (scales as float16, as
in the file: ``fused_decode.half_scales``), or
float32 rows (a float output head). The step's small operations (RMSNorm, rotary, attention over
the KV cache, SiLU) are float32; ``exp`` is a vectorised polynomial (Cephes' expf).
OpenMP shares each product's output rows (and attention's heads) out over the threads; every
row is computed whole by one thread, so results do not depend on the thread count.
"""

from __future__ import annotations

import ctypes

from imagefm.models.fused_dots import DOTS_SOURCE
from imagefm.models.quant_kernel import LazyLibrary, build_library

STEP_SOURCE = r"""

/* Where a step's time goes, when asked (fused_profile): seconds per part, summed over calls,
   as the first thread sees them (waits for the others included). */
enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GATE_UP, P_SILU, P_DOWN, P_HEAD, P_PARTS };
static double profile[P_PARTS];
static int profiling;
static inline double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}
static inline int first_thread(void) {
#ifdef _OPENMP
  return omp_get_thread_num() == 0;
#else
  return 1;
#endif
}
#define TICK(part) do { if (profiling && first_thread()) { const double t_ = now(); \
    profile[part] += t_ - last; last = t_; } } while (0)

/* mode 1: start collecting from zero; 0: stop; out (P_PARTS doubles) gets the sums so far */
void fused_profile(int mode, double *out) {
  if (mode == 1) memset(profile, 0, sizeof profile);
  profiling = mode;
  if (out) memcpy(out, profile, sizeof profile);
}

enum { W_F32 = 0, W_Q4 = 4, W_Q8 = 8 };

typedef struct {      /* one weight matrix [n, k] */
  const void *q;      /* uint8 [n, k/2] (4-bit), int8 [n, k] (8-bit) or float [n, k] */
  const uint16_t *s;  /* float16 [n, k/32, 2] (d, m) or [n, k/32] (d); unused for floats */
  const float *bias;  /* [n] or NULL */
  int64_t n, k, type;
} Mat;

typedef struct {
  const float *attn_norm, *mlp_norm, *q_norm, *k_norm; /* q/k norm [head_dim] or NULL */
  Mat q, k, v, o, gate, up, down;
} Layer;

typedef struct {
  int64_t layers, width, heads, kv_heads, head_dim, mlp_dim, vocab;
  double eps;
  const float *embed; /* [vocab, width] */
  const float *norm;  /* [width] */
  const Layer *layer;
  Mat head;
} Model;

/* one sequence's KV cache: [layers (stride apart), kv_heads, capacity, head_dim] */
typedef struct {
  float *keys, *values;
  int64_t capacity, length; /* the new token is written at `length` */
  int64_t stride;           /* floats from one layer to the next */
  int64_t start;            /* first position attended to (left padding before it) */
} Cache;

/* rows n .. n + rows - 1 of m times input a */
static inline __attribute__((always_inline)) void dot_rows(const Mat *m, int64_t n, int rows,
                                                           const Act *a, float *out) {
  const int64_t G = m->k / 32;
  if (m->type == W_Q4)
    dot_q4_tile((const uint8_t *)m->q + n * m->k / 2, m->s + 2 * n * G, a, G, rows, out);
  else if (m->type == W_Q8)
    dot_q8_tile((const int8_t *)m->q + n * m->k, m->s + n * G, a, G, rows, out);
  else
    for (int r = 0; r < rows; r++)
      out[r] = dot_f32((const float *)m->q + (n + r) * m->k, a->x, m->k);
}

static inline void matvec_tile(const Mat *m, int64_t t, const Act *acts, int64_t B, float *y,
                               int64_t ystride) {
  const int64_t n = t * ROWS;
  const int rows = m->n - n < ROWS ? (int)(m->n - n) : ROWS;
  float out[ROWS];
  for (int64_t b = 0; b < B; b++) {
    if (rows == ROWS) dot_rows(m, n, ROWS, acts + b, out);
    else dot_rows(m, n, rows, acts + b, out);
    for (int r = 0; r < rows; r++)
      y[b * ystride + n + r] = out[r] + (m->bias ? m->bias[n + r] : 0.0f);
  }
}

static inline int64_t team_size(void) {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

/* y[b, n] (row stride ystride) for B inputs; tiles of output rows shared out over the threads
   in chunks taken as threads come free (~8 a thread: a thread slowed by another process on
   its core does less, instead of holding the others at the barrier).
   Call inside the parallel region; `wait` 0 leaves out the barrier at the end. */
static void matvec(const Mat *m, const Act *acts, int64_t B, float *y, int64_t ystride,
                   int wait) {
  const int64_t tiles = (m->n + ROWS - 1) / ROWS, chunk = tiles / (8 * team_size()) + 1;
  if (wait) {
    #pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < tiles; t++) matvec_tile(m, t, acts, B, y, ystride);
  } else {
    #pragma omp for schedule(dynamic, chunk) nowait
    for (int64_t t = 0; t < tiles; t++) matvec_tile(m, t, acts, B, y, ystride);
  }
}

/* out = x / rms(x) * weight, as torch.nn.functional.rms_norm then the weight */
static void rmsnorm(const float *x, const float *weight, float *out, int64_t n, float eps) {
  v16f acc = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) { v16f v = load16(x + i); acc += v * v; }
  float ss = 0.0f;
  for (int j = 0; j < 16; j++) ss += acc[j];
  for (; i < n; i++) ss += x[i] * x[i];
  const float scale = 1.0f / sqrtf(ss / (float)n + eps);
  for (i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] */
static void rotate(float *x, const float *cos, const float *sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* softmax(q . k_t / sqrt(dim)) . v_t over the first `n` cached positions of one head */
static void attend(const float *q, const float *keys, const float *values, int64_t n,
                   int64_t dim, float *scores, float *out) {
  const float scale = 1.0f / sqrtf((float)dim);
  float top = -INFINITY;
  int64_t t = 0;
  if (dim % 16 == 0) /* four keys at a time: independent chains */
    for (; t + 4 <= n; t += 4) {
      v16f acc[4] = {{0}};
      for (int64_t i = 0; i < dim; i += 16) {
        const v16f x = load16(q + i);
        for (int j = 0; j < 4; j++) acc[j] += load16(keys + (t + j) * dim + i) * x;
      }
      for (int j = 0; j < 4; j++) {
        scores[t + j] = vsum(acc[j]) * scale;
        top = fmaxf(top, scores[t + j]);
      }
    }
  for (; t < n; t++) {
    scores[t] = dot_f32(keys + t * dim, q, dim) * scale;
    top = fmaxf(top, scores[t]);
  }
  float total = 0.0f;
  for (t = 0; t + 16 <= n; t += 16) {
    const v16f e = vexp(load16(scores + t) - top);
    store16(scores + t, e);
    total += vsum(e);
  }
  for (; t < n; t++) { scores[t] = expf(scores[t] - top); total += scores[t]; }
  const float inv = 1.0f / total;
  if (dim % 16 == 0 && dim <= 256) { /* the sum in registers */
    v16f acc[16] = {{0}};
    for (t = 0; t < n; t++) {
      const float w = scores[t] * inv;
      for (int64_t j = 0; j < dim / 16; j++) acc[j] += w * load16(values + t * dim + 16 * j);
    }
    for (int64_t j = 0; j < dim / 16; j++) store16(out + 16 * j, acc[j]);
    return;
  }
  for (int64_t i = 0; i < dim; i++) out[i] = 0.0f;
  for (t = 0; t < n; t++) {
    const float w = scores[t] * inv;
    const float *v = values + t * dim;
    for (int64_t i = 0; i < dim; i++) out[i] += w * v[i];
  }
}

static inline int64_t max3(int64_t a, int64_t b, int64_t c) {
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

/* Multiply B float inputs [B, m->k] by one matrix: y [B, m->n] (tests, and a building block). */
void fused_matvec(const Mat *m, const float *x, float *y, int64_t B, int threads) {
  Act *acts = calloc(B, sizeof(Act));
  for (int64_t b = 0; b < B; b++) {
    act_init(acts + b, m->k);
    act_quantize(acts + b, x + b * m->k, m->k);
  }
  #pragma omp parallel num_threads(threads) if(threads > 1)
  matvec(m, acts, B, y, m->n, 1);
  for (int64_t b = 0; b < B; b++) act_free(acts + b);
  free(acts);
}

static void silu_times_up(const float *g, int64_t F, float *a) { /* g: [gate | up] */
  int64_t i = 0;
  for (; i + 16 <= F; i += 16) {
    const v16f v = load16(g + i);
    store16(a + i, v / (1.0f + vexp(-v)) * load16(g + F + i));
  }
  for (; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * g[F + i];
}

/* One decoding step for B sequences: token b is written at caches[b].length of its own cache
   and attends over its own cache (from caches[b].start); cos/sin [B, head_dim] are its
   rotation; logits [B, vocab]. Each thread keeps its own copy of the residual stream and does
   the small per-vector work (norms, input rounding, SiLU) itself, so threads meet only where
   they need each other's results: 6 barriers a layer. */
void fused_decode_step(const Model *M, int64_t B, const int64_t *tokens, const Cache *caches,
                       const float *cos, const float *sin, float *logits, int threads) {
  const int64_t W = M->width, H = M->heads, KV = M->kv_heads, D = M->head_dim, F = M->mlp_dim;
  const int64_t QD = H * D, QKV = (H + 2 * KV) * D, kmax = max3(W, F, QD);
  const float eps = (float)M->eps;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++)
    if (caches[b].length + 1 > longest) longest = caches[b].length + 1;
  /* shared: the products' outputs and attention's */
  float *qkv = malloc(sizeof(float) * B * QKV), *att = malloc(sizeof(float) * B * QD);
  float *gu = malloc(sizeof(float) * B * 2 * F), *out = malloc(sizeof(float) * B * W);
  float *scores = malloc(sizeof(float) * B * H * longest);
  #pragma omp parallel num_threads(threads) if(threads > 1)
  {
    double last = profiling ? now() : 0.0;
    float *x = malloc(sizeof(float) * B * W), *h = malloc(sizeof(float) * B * kmax);
    Act *acts = calloc(B, sizeof(Act));
    for (int64_t b = 0; b < B; b++) {
      act_init(acts + b, kmax);
      memcpy(x + b * W, M->embed + tokens[b] * W, sizeof(float) * W);
    }
    for (int64_t l = 0; l < M->layers; l++) {
      const Layer *L = M->layer + l;
      for (int64_t b = 0; b < B; b++) {
        rmsnorm(x + b * W, L->attn_norm, h + b * kmax, W, eps);
        act_quantize(acts + b, h + b * kmax, W);
      }
      TICK(P_NORM);
      matvec(&L->q, acts, B, qkv, QKV, 0);
      matvec(&L->k, acts, B, qkv + QD, QKV, 0);
      matvec(&L->v, acts, B, qkv + QD + KV * D, QKV, 1);
      TICK(P_QKV);
      #pragma omp for schedule(dynamic, 1)
      for (int64_t bi = 0; bi < B * (H + KV); bi++) { /* q/k norm, rotary, keys/values out */
        const int64_t b = bi / (H + KV), i = bi % (H + KV);
        float *head = qkv + b * QKV + i * D;
        const float *w = i < H ? L->q_norm : L->k_norm;
        if (w) rmsnorm(head, w, head, D, eps);
        rotate(head, cos + b * D, sin + b * D, D);
        if (i >= H) {
          const Cache *c = caches + b;
          const int64_t j = i - H, at = l * c->stride + (j * c->capacity + c->length) * D;
          memcpy(c->keys + at, head, sizeof(float) * D);
          memcpy(c->values + at, qkv + b * QKV + QD + (KV + j) * D, sizeof(float) * D);
        }
      }
      TICK(P_ROPE);
      #pragma omp for schedule(dynamic, 1)
      for (int64_t bi = 0; bi < B * H; bi++) {
        const int64_t b = bi / H, i = bi % H, j = i / (H / KV);
        const Cache *c = caches + b;
        const int64_t base = l * c->stride + (j * c->capacity + c->start) * D;
        attend(qkv + b * QKV + i * D, c->keys + base, c->values + base,
               c->length + 1 - c->start, D, scores + bi * longest, att + b * QD + i * D);
      }
      for (int64_t b = 0; b < B; b++) act_quantize(acts + b, att + b * QD, QD);
      TICK(P_ATTN);
      matvec(&L->o, acts, B, out, W, 1);
      TICK(P_O);
      for (int64_t b = 0; b < B; b++) {
        for (int64_t i = 0; i < W; i++) x[b * W + i] += out[b * W + i];
        rmsnorm(x + b * W, L->mlp_norm, h + b * kmax, W, eps);
        act_quantize(acts + b, h + b * kmax, W);
      }
      TICK(P_NORM);
      matvec(&L->gate, acts, B, gu, 2 * F, 0);
      matvec(&L->up, acts, B, gu + F, 2 * F, 1);
      TICK(P_GATE_UP);
      for (int64_t b = 0; b < B; b++) {
        silu_times_up(gu + b * 2 * F, F, h + b * kmax);
        act_quantize(acts + b, h + b * kmax, F);
      }
      TICK(P_SILU);
      matvec(&L->down, acts, B, out, W, 1);
      TICK(P_DOWN);
      for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < W; i++) x[b * W + i] += out[b * W + i];
      TICK(P_NORM);
    }
    for (int64_t b = 0; b < B; b++) {
      rmsnorm(x + b * W, M->norm, h + b * kmax, W, eps);
      act_quantize(acts + b, h + b * kmax, W);
    }
    TICK(P_NORM);
    matvec(&M->head, acts, B, logits, M->vocab, 1);
    TICK(P_HEAD);
    for (int64_t b = 0; b < B; b++) act_free(acts + b);
    free(acts); free(x); free(h);
  }
  free(qkv); free(att); free(gu); free(out); free(scores);
}

int fused_path(void) { return PATH; }
"""


FUSED_SOURCE = DOTS_SOURCE + STEP_SOURCE


class Mat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("s", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("type", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("attn_norm", "mlp_norm", "q_norm",
                                                       "k_norm")] + \
               [(name, Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "width", "heads", "kv_heads",
                                                     "head_dim", "mlp_dim", "vocab")] + \
               [("eps", ctypes.c_double), ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p),
                ("layer", ctypes.POINTER(Layer)), ("head", Mat)]


class Cache(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                ("capacity", ctypes.c_int64), ("length", ctypes.c_int64),
                ("stride", ctypes.c_int64), ("start", ctypes.c_int64)]


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.fused_matvec.argtypes = [ctypes.POINTER(Mat), p, p, i64, i32]
    library.fused_matvec.restype = None
    library.fused_decode_step.argtypes = [ctypes.POINTER(Model), i64, p, ctypes.POINTER(Cache),
                                          p, p, p, i32]
    library.fused_decode_step.restype = None
    library.fused_profile.argtypes = [i32, p]
    library.fused_profile.restype = None
    library.fused_path.argtypes = []
    library.fused_path.restype = i32
    return library




def build_fused(flag_sets: tuple[tuple[str, ...], ...] | None = None) -> ctypes.CDLL:
    """Compile and load the fused step (``flag_sets`` instead of the usual ones: tests build
    the AVX2 and portable variants with them). Raises RuntimeError saying why it cannot."""
    if flag_sets is None:
        return build_library("fused_decode", FUSED_SOURCE, _bind)
    return build_library("fused_decode", FUSED_SOURCE, _bind, flag_sets)


_FUSED = LazyLibrary(build_fused)


def fused_kernel() -> ctypes.CDLL | None:
    """The compiled fused step (built on the first call), or None where it cannot be."""
    return _FUSED.get()


def fused_kernel_status() -> tuple[bool, str]:
    """(available, detail): builds the fused step if needed and says why it is missing."""
    library = fused_kernel()
    if library is None:
        return False, _FUSED.error or "unknown"
    return True, {512: "AVX-512 VNNI", 256: "AVX2"}.get(library.fused_path(), "portable C")
