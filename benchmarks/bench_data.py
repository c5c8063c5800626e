"""Data-path throughput and memory: synthetic generation, and the streaming training pipeline.

1. ``--synth``: synthetic scenes per second at 64 px and 224 px, 1 worker and every core.
2. The streaming pipeline of ``data.source=stream`` alone (no model): WebDataset shards →
   virtual streams (shuffle buffer of encoded records) → JPEG decode → per-sample
   preprocessing to the model's size (random resized crop + flip when ``--augment``) → caption
   choice and tokenisation → batches. Samples/s with 0 DataLoader workers (the main process,
   one core) and with ``--workers``; the training step it must outrun is in docs/benchmarks.md.
3. Flat memory: the same pipeline over 20,000 and over 200,000 samples (``--scale``), each in
   a fresh process; peak RSS of the main process and of the largest worker. Goal: within 10%.

The shards hold ``--distinct`` different synthetic 256 px JPEGs (scenes, English and Korean
captions) repeated under new keys up to the largest count, written once into ``--dir`` and
reused. Repeats are interleaved and medians printed.

    python benchmarks/bench_data.py --size 128 --workers 2 --repeats 3        # rate, `small`
    python benchmarks/bench_data.py --size 224 --workers 2 --repeats 3        # rate, ViT-B/16
    python benchmarks/bench_data.py --scale --size 128 --workers 2            # flat memory
    python benchmarks/bench_data.py --synth
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCALES = (20_000, 200_000)


def synth_rate(image_size: int, n: int, workers: int) -> float:
    from imagefm.data.synthetic import generate

    start = time.perf_counter()
    count = sum(1 for _ in generate("scenes", n, seed=1, image_size=image_size, workers=workers))
    return count / (time.perf_counter() - start)


def write_shards(out: Path, n: int, distinct: int) -> None:
    """``n`` samples in shards of 10,000: ``distinct`` 256 px JPEG scenes under new keys, plus a
    BPE tokenizer trained on their captions (``out/tokenizer``). Written once."""
    stamp = out / "bench.json"
    wanted = {"n": n, "distinct": distinct}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return
    from PIL import Image

    from imagefm.data.formats import ShardWriter
    from imagefm.data.synthetic import generate
    from imagefm.tokenizer import train_bpe

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.tar"):
        old.unlink()
    base = []
    for record in generate("scenes", distinct, seed=2, image_size=256, workers=os.cpu_count()):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(record.image)).convert("RGB").save(buffer, "JPEG", quality=90)
        record.image, record.image_ext = buffer.getvalue(), "jpg"
        base.append(record)
    train_bpe([c.text for r in base for c in r.captions], vocab_size=2000, context_length=32,
              min_frequency=1, padding="longest").save_pretrained(out / "tokenizer")
    with ShardWriter(out, prefix="train", max_samples=10_000) as writer:
        for i in range(n):
            record = base[i % distinct]
            record.key = f"s{i:07d}"
            writer.write(record)
    stamp.write_text(json.dumps(wanted))


def stream(shards: Path, limit: int, size: int, workers: int, augment: bool,
           batch_size: int = 256) -> dict[str, float]:
    """Run the pipeline over ``limit`` samples in this process; rate and peak RSS."""
    import torch

    from imagefm.config import ImageCard
    from imagefm.data.loader import Collate
    from imagefm.data.stream import StreamLoader, input_units
    from imagefm.tokenizer import Tokenizer
    from imagefm.train.stream_data import image_transform

    torch.set_num_threads(1)  # per-sample work: one thread per process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = Tokenizer.from_pretrained(shards / "tokenizer")
    transform = image_transform(ImageCard(image_size=size),
                                {"scale": [0.9, 1.0], "hflip_prob": 0.5} if augment else None)
    loader = StreamLoader(input_units(str(shards)), batch_size=batch_size,
                          num_workers=workers, streams=max(workers, 1), seed=0,
                          shuffle_buffer=1000, samples_per_epoch=limit, transform=transform,
                          collate=Collate(tokenizer=tokenizer, lang=["en", "ko"]), log=None)
    start, count = time.perf_counter(), 0
    for batch in loader(0):
        count += len(batch["pixel_values"])
    seconds = time.perf_counter() - start
    kib = 1024 if sys.platform != "darwin" else 1
    return {"samples": count, "samples_per_s": count / seconds,
            "main_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 2**20,
            "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 2**20}


def in_child(args: argparse.Namespace, limit: int, workers: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", "--dir", str(args.dir), "--limit", str(limit),
               "--size", str(args.size), "--workers", str(workers)]
    if args.augment:
        command.append("--augment")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/imagefm-bench-data"))
    parser.add_argument("--size", type=int, default=128, help="model image size (small: 128)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n", type=int, default=20_000, help="samples per rate measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distinct", type=int, default=512)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--scale", action="store_true", help="peak RSS at 20,000 vs 200,000")
    parser.add_argument("--synth", action="store_true", help="synthetic generation rates")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(stream(args.dir, args.limit, args.size, args.workers, args.augment)))
        return
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores; {args.repeats} repeats, medians")
    if args.synth:
        for size in (64, 224):
            for workers in sorted({1, cores}):
                rates = [synth_rate(size, 500 if size == 64 else 200, workers)
                         for _ in range(args.repeats)]
                print(f"synthetic scenes {size:>3} px, {workers} worker(s): "
                      f"{statistics.median(rates):8.0f} images/s")
        return
    write_shards(args.dir, max(SCALES) if args.scale else args.n, args.distinct)
    what = f"{args.size} px, {'augment' if args.augment else 'no augment'}"
    if args.scale:
        for limit in SCALES:
            result = in_child(args, limit, args.workers)
            main_mb, worker_mb = result["main_rss_mb"], result["worker_rss_mb"]
            print(f"{limit:>7,} samples ({what}, {args.workers} workers): "
                  f"{result['samples_per_s']:6.0f} samples/s, peak RSS main {main_mb:.0f} MB, "
                  f"largest worker {worker_mb:.0f} MB")
        return
    rates: dict[int, list[float]] = {}
    for _ in range(args.repeats):  # interleaved
        for workers in sorted({0, args.workers}):
            rates.setdefault(workers, []).append(in_child(args, args.n, workers)["samples_per_s"])
    for workers, values in sorted(rates.items()):
        label = "main process" if workers == 0 else f"{workers} workers"
        print(f"stream pipeline ({what}), {label:<13}: {statistics.median(values):7.0f} "
              f"samples/s (runs: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
