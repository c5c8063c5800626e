"""Image search and serving benchmarks: indexing speed, query latency/recall, server throughput.

Three parts, each optional (default: all, with sizes that finish in minutes on 2 cores):

* ``indexing``: synthetic scene images written as JPEG files, indexed end to end (walk, decode
  in worker processes, embed, SQLite, FAISS); prints images/s.
* ``vectors``: synthetic unit vectors shaped like image embeddings (clusters in a low-dimensional
  subspace plus noise, not uniform noise, which no ANN index handles well and no model
  produces); for each size, exact (flat) vs HNSW per ``ef_search`` (and optionally IVF-PQ): build
  time, single-query latency p50/p99 and recall@10 against exact search.
* ``server``: the real server (uvicorn, in a subprocess) under C concurrent loopback clients,
  dynamic batching on (``max_batch``) vs off (``max_batch=1``), interleaved over ``--repeats``
  runs (on, off, on, off, ...; a fresh server each run): requests/s, latency p50/p99, the mean
  batch size the model saw and the server's CPU time per request, each run and the medians, and
  the ratio of the medians. The load average is printed at the start and the end: on a shared
  machine the ratios mean more than the absolute numbers.

    python benchmarks/bench_search.py                                   # all, small sizes
    python benchmarks/bench_search.py --parts vectors --sizes 10000,100000,1000000
    python benchmarks/bench_search.py --parts server --preset small --clients 32 --duration 10
    python benchmarks/bench_search.py --parts indexing --images 2000 --preset small

Everything stays on 127.0.0.1; the server part runs a bounded number of seconds per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def tiny_tokenizer(context_length: int):
    """A small English + Korean BPE so random checkpoints can be saved and served."""
    from imagefm.data.synthetic.vocab import COLOURS, SHAPES
    from imagefm.tokenizer import train_bpe

    texts = [f"a photo of a {c.en} {s.en}" for c in COLOURS.values() for s in SHAPES.values()]
    texts += [f"{c.ko} {s.ko} 사진" for c in COLOURS.values() for s in SHAPES.values()]
    return train_bpe(texts * 2, vocab_size=600, context_length=context_length)


def make_checkpoint(preset: str, out: Path) -> Path:
    import torch

    import imagefm
    from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer

    torch.manual_seed(0)
    base = imagefm.preset(preset)
    tokenizer = tiny_tokenizer(base.text.context_length)
    model = DualEncoder(fit_text_to_tokenizer(base, tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(out)
    return out


# --- indexing -------------------------------------------------------------------------------------

def bench_indexing(args: argparse.Namespace, work: Path) -> None:
    from imagefm.apps.search import Index
    from imagefm.data.image import open_image
    from imagefm.data.synthetic import generate

    checkpoint = Path(args.model) if args.model else make_checkpoint(args.preset,
                                                                     work / "ckpt")
    photos = work / "photos"
    photos.mkdir()
    started = time.perf_counter()
    for i, record in enumerate(generate("scenes", args.images, seed=0,
                                        image_size=args.image_px)):
        folder = photos / f"{i // 500:03d}"
        folder.mkdir(exist_ok=True)
        open_image(record.image).save(folder / f"{i:06d}.jpg", quality=90)
    print(f"wrote {args.images} JPEG files of {args.image_px}px in "
          f"{time.perf_counter() - started:.1f} s")
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    for run, precision in enumerate(args.precision.split(",")):  # each from scratch, in turn
        out = work / f"photos-{run}-{precision}.index"
        started = time.perf_counter()
        index = Index.build(photos, out, checkpoint, workers=workers,
                            batch_size=args.batch_size, device=args.device, precision=precision)
        seconds = time.perf_counter() - started
        print(f"indexing ({args.model or args.preset}, {precision}, {workers} decode workers, "
              f"batch {args.batch_size}, {index.device}): {args.images} images in "
              f"{seconds:.1f} s = {args.images / seconds:.1f} images/s end to end "
              f"({index.kind} index)")
        started = time.perf_counter()
        again = Index.build(photos, out, checkpoint, workers=workers)
        print(f"re-run with nothing changed: {time.perf_counter() - started:.2f} s "
              f"({again.last_report.unchanged} unchanged)")
        index.close()
        again.close()


# --- vectors --------------------------------------------------------------------------------------

def embedding_like(n: int, dim: int, seed: int, *, latent: int = 128, clusters: int = 10_000,
                   chunk: int = 100_000) -> np.ndarray:
    """Unit vectors: cluster centres in a ``latent``-dim subspace, points spread around them as
    far as the centres are apart, a random linear map to ``dim`` and a little full-dimensional
    noise. Harder for HNSW than well-separated clusters, easier than uniform noise (which no
    model produces). Generated in chunks; ``seed`` picks the points, the "model" is fixed."""
    base = np.random.default_rng(1234)
    centres = base.standard_normal((clusters, latent)).astype(np.float32)
    lift = (base.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, latent),
                                                                        dtype=np.float32)
        x = z @ lift + 0.2 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def query_latencies(index, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """One query per call (as a server does), milliseconds each, and the ids found."""
    found = np.empty((len(queries), k), dtype=np.int64)
    times = []
    for i in range(len(queries)):
        started = time.perf_counter()
        _, ids = index.search(queries[i:i + 1], k)
        times.append((time.perf_counter() - started) * 1000)
        found[i] = ids[0]
    return times, found


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth,
                                                                      strict=True)]))


def bench_vectors(args: argparse.Namespace) -> None:
    import faiss

    from imagefm.apps.search.vectors import VectorIndex, VectorIndexConfig

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    k = 10
    efs = [int(x) for x in args.ef_search.split(",")]
    print(f"vectors: dim {args.dim}, k={k}, {args.queries} single queries per setting, "
          f"faiss {faiss.__version__}, {os.cpu_count()} cores")
    for size in [int(s) for s in args.sizes.split(",")]:
        data = embedding_like(size, args.dim, seed=1)
        queries = embedding_like(args.queries, args.dim, seed=2)
        ids = np.arange(size, dtype=np.int64)
        started = time.perf_counter()
        flat = VectorIndex.build(data, ids, kind="flat")
        flat_build = time.perf_counter() - started
        exact_scores, truth = flat.search(queries, k)  # batched: the exact answers
        exact_queries = queries[: max(20, args.queries // (10 if size >= 500_000 else 1))]
        times, _ = query_latencies(flat, exact_queries, k)
        print(f"  n={size:>9,}  flat   build {flat_build:7.1f} s  p50 {percentile(times, 50):7.3f}"
              f" ms  p99 {percentile(times, 99):7.3f} ms  recall@10 1.000  "
              f"({len(exact_queries)} queries; mean cosine of the true 1st/10th neighbour "
              f"{exact_scores[:, 0].mean():.3f}/{exact_scores[:, -1].mean():.3f})")
        del flat
        config = VectorIndexConfig(hnsw_m=args.hnsw_m,
                                   hnsw_ef_construction=args.ef_construction)
        started = time.perf_counter()
        hnsw = VectorIndex.build(data, ids, config, kind="hnsw")
        build = time.perf_counter() - started
        print(f"  n={size:>9,}  hnsw   build {build:7.1f} s  (M={args.hnsw_m}, "
              f"ef_construction={args.ef_construction})")
        for ef in efs:
            hnsw.config.hnsw_ef_search = ef
            query_latencies(hnsw, queries[:50], k)  # warm caches
            times, found = query_latencies(hnsw, queries, k)
            print(f"  n={size:>9,}  hnsw   ef_search={ef:<4d} p50 {percentile(times, 50):7.3f} ms"
                  f"  p99 {percentile(times, 99):7.3f} ms  recall@10 {recall(found, truth):.3f}")
        del hnsw
        if args.ivfpq:
            started = time.perf_counter()
            ivf = VectorIndex.build(data, ids, VectorIndexConfig(), kind="ivfpq")
            build = time.perf_counter() - started
            for nprobe in (16, 64):
                ivf.config.ivf_nprobe = nprobe
                times, found = query_latencies(ivf, queries, k)
                print(f"  n={size:>9,}  ivfpq  build {build:7.1f} s  nprobe={nprobe:<3d} p50 "
                      f"{percentile(times, 50):7.3f} ms  p99 {percentile(times, 99):7.3f} ms  "
                      f"recall@10 {recall(found, truth):.3f}")
            del ivf
        del data


# --- server ---------------------------------------------------------------------------------------

SERVER_SCRIPT = """
import sys, uvicorn, imagefm
from imagefm.serve import ServeSettings, create_app
model = imagefm.load(sys.argv[1]).to(sys.argv[5]).eval()
settings = ServeSettings(port=int(sys.argv[2]), max_batch=int(sys.argv[3]),
                         max_wait_ms=float(sys.argv[4]), max_queue=4096, timeout_s=120,
                         precision=sys.argv[7],
                         **({"decode_threads": int(sys.argv[6])} if int(sys.argv[6]) else {}))
uvicorn.run(create_app(model, settings=settings), host="127.0.0.1", port=settings.port,
            log_level="warning", access_log=False)
"""


class LoopbackClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: cheap enough that 32 of them
    leave the CPU to the server being measured (httpx costs more per request than the server)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def request_bodies(kind: str, image_px: int) -> list[bytes]:
    if kind == "text":
        from imagefm.data.synthetic.vocab import COLOURS, SHAPES

        texts = [f"a photo of a {c.en} {s.en}" for c in COLOURS.values() for s in SHAPES.values()]
        texts += [f"{c.ko} {s.ko}" for c in COLOURS.values() for s in SHAPES.values()]
        return [json.dumps({"input": t}).encode() for t in texts]
    from imagefm.data.image import open_image
    from imagefm.data.synthetic import generate

    bodies = []
    for record in generate("scenes", 16, seed=3, image_size=image_px):
        buffer = io.BytesIO()
        open_image(record.image).save(buffer, format="JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        bodies.append(json.dumps({"input": url}).encode())
    return bodies


async def load(port: int, bodies: list[bytes], clients: int, duration: float, warmup: float,
               on_measure: Callable[[], None] | None = None
               ) -> tuple[list[float], int, float]:
    """C clients posting back to back; latencies (ms) of requests finished after warm-up.
    ``on_measure`` is called when the warm-up ends (and the measured time starts)."""
    latencies: list[float] = []
    errors = 0
    started = time.perf_counter()
    measure_from = started + warmup
    stop_at = measure_from + duration

    async def mark() -> None:
        await asyncio.sleep(warmup)
        if on_measure is not None:
            on_measure()

    async def client(number: int) -> None:
        nonlocal errors
        connection = LoopbackClient(port)
        i = number
        try:
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                status, _ = await connection.post("/v1/embeddings", bodies[i % len(bodies)])
                done = time.perf_counter()
                i += clients
                if done >= measure_from:
                    latencies.append((done - sent) * 1000)
                    errors += status != 200
        finally:
            connection.close()

    await asyncio.gather(mark(), *(client(n) for n in range(clients)))
    return latencies, errors, time.perf_counter() - measure_from


def wait_for_server(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited; run it by hand to see why")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def server_stats(port: int) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.loads(response.read())["batching"]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def run_server_once(args: argparse.Namespace, checkpoint: Path, bodies: list[bytes], kind: str,
                    max_batch: int, env: dict[str, str]) -> dict[str, float]:
    """One fresh server process under load: req/s, p50/p99 ms, mean batch, errors, and the
    server's CPU milliseconds per request (its share of a busy machine varies; this does not)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(checkpoint), str(port), str(max_batch),
         str(args.max_wait_ms), args.device, str(args.decode_threads),
         args.precision.split(",")[0]], env=env)
    try:
        wait_for_server(port, process)
        cpu: list[float | None] = []
        client_cpu: list[float] = []

        busy: list[float] = []
        stats_key = "text" if kind == "text" else "image"

        def on_measure() -> None:
            cpu.append(cpu_seconds(process.pid))
            client_cpu.append(time.process_time())
            busy.append(server_stats(port)[stats_key]["busy_s"])

        latencies, errors, seconds = asyncio.run(
            load(port, bodies, args.clients, args.duration, args.warmup, on_measure=on_measure))
        cpu_before, cpu_after = cpu[0], cpu_seconds(process.pid)
        client_ms = 1000 * (time.process_time() - client_cpu[0]) / max(1, len(latencies))
        stats = server_stats(port)[stats_key]
    finally:
        process.terminate()
        process.wait(timeout=30)
    cpu_ms = (float("nan") if cpu_before is None or cpu_after is None
              else 1000 * (cpu_after - cpu_before) / max(1, len(latencies)))
    return {"rps": len(latencies) / seconds, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "batch": stats["mean_size"], "errors": errors,
            "cpu_ms": cpu_ms, "client_ms": client_ms,
            "model_busy": (stats["busy_s"] - busy[0]) / seconds}


def bench_server(args: argparse.Namespace, work: Path) -> None:
    checkpoint = Path(args.model) if args.model else make_checkpoint(args.preset, work / "srv")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                       os.environ.get("PYTHONPATH", "")])}
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)  # torch's intra-op threads
    modes = (("batching on", args.max_batch), ("batching off", 1))
    print(f"server: {args.model or args.preset}, {args.clients} concurrent clients, "
          f"{args.duration:g} s per run after {args.warmup:g} s warm-up, device {args.device}, "
          f"{args.repeats} repeats (on and off interleaved), precision "
          f"{args.precision.split(',')[0]}, decode threads "
          f"{args.decode_threads or 'default'}, torch threads {args.server_threads or 'default'}; "
          f"{load_average()}")
    for kind in args.server_inputs.split(","):
        bodies = request_bodies(kind, args.image_px)
        runs: dict[str, list[dict[str, float]]] = {label: [] for label, _ in modes}
        for repeat in range(args.repeats):
            for label, max_batch in modes:
                run = run_server_once(args, checkpoint, bodies, kind, max_batch, env)
                runs[label].append(run)
                print(f"  {kind:5s} {label:12s} run {repeat + 1}  max_batch={max_batch:<3d} "
                      f"{run['rps']:8.1f} req/s  p50 {run['p50']:7.1f} ms  p99 "
                      f"{run['p99']:7.1f} ms  mean batch {run['batch']:5.1f}  server CPU "
                      f"{run['cpu_ms']:6.2f} ms/req  client CPU {run['client_ms']:5.2f} ms/req"
                      f"  model busy {100 * run['model_busy']:3.0f} %  errors {run['errors']:.0f}")
        medians = {label: {key: float(np.median([r[key] for r in results]))
                           for key in results[0]} for label, results in runs.items()}
        for label, m in medians.items():
            print(f"  {kind:5s} {label:12s} median     {m['rps']:8.1f} req/s  p50 {m['p50']:7.1f}"
                  f" ms  p99 {m['p99']:7.1f} ms  mean batch {m['batch']:5.1f}  server CPU "
                  f"{m['cpu_ms']:6.2f} ms/req")
        on, off = medians["batching on"], medians["batching off"]
        print(f"  {kind:5s} dynamic batching: {on['rps'] / off['rps']:.2f}x the throughput of one "
              f"request at a time (ratio of medians); {off['cpu_ms'] / on['cpu_ms']:.2f}x less "
              f"server CPU per request")
    print(f"server: done; {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="indexing,vectors,server")
    parser.add_argument("--model", help="checkpoint (default: a random --preset model)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32",
                        help="fp32 or bf16 (bfloat16 autocast); indexing takes a list, e.g. "
                             "fp32,bf16, and indexes once with each; the server the first")
    parser.add_argument("--images", type=int, default=1000, help="indexing: how many files")
    parser.add_argument("--image-px", type=int, default=256, help="synthetic image size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--sizes", default="10000,100000", help="vectors: index sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", default="32,64,96,128,256")
    parser.add_argument("--ivfpq", action="store_true", help="vectors: also IVF-PQ")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--server-inputs", default="text,image")
    parser.add_argument("--repeats", type=int, default=3,
                        help="server: runs per mode, on and off interleaved; medians reported")
    parser.add_argument("--decode-threads", type=int, default=0,
                        help="server: image decoding threads (0: the server's default)")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="server: torch intra-op threads (OMP_NUM_THREADS; 0: torch default)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        work = Path(tmp)
        if "indexing" in parts:
            bench_indexing(args, work)
        if "vectors" in parts:
            bench_vectors(args)
        if "server" in parts:
            bench_server(args, work)


if __name__ == "__main__":
    main()
