"""Data-path throughput: synthetic generation, and shard reading + preprocessing to 224x224.

1. Synthetic scenes per second at 64 px and 224 px, with 1 worker and with every core.
2. Reading WebDataset shards of pre-resized 224 px JPEGs, decoding and preprocessing them per a
   model card (resize/crop/normalise → float tensors), with 0 DataLoader workers (one core) and
   with every core. The goal is >= 1,000 preprocessed 224² samples/s per core.

Repeats are interleaved and medians printed.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --n 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imagefm.config import ImageCard
from imagefm.data.formats import ShardWriter
from imagefm.data.image import ImageProcessor
from imagefm.data.loader import Collate, ShardDataset
from imagefm.data.synthetic import generate


def synth_rate(image_size: int, n: int, workers: int) -> float:
    start = time.perf_counter()
    count = sum(1 for _ in generate("scenes", n, seed=1, image_size=image_size, workers=workers))
    return count / (time.perf_counter() - start)


def write_jpeg_shards(out: Path, n: int) -> None:
    """Pre-resized 224 px JPEG shards (what a prepared real dataset looks like)."""
    from PIL import Image

    with ShardWriter(out, max_samples=500) as writer:
        for record in generate("scenes", n, seed=2, image_size=224, workers=os.cpu_count()):
            buffer = io.BytesIO()
            Image.open(io.BytesIO(record.image)).convert("RGB").save(buffer, "JPEG", quality=90)
            record.image, record.image_ext = buffer.getvalue(), "jpg"
            writer.write(record)


def read_rate(shard_dir: Path, workers: int, batch_size: int = 64) -> float:
    collate = Collate(ImageProcessor(ImageCard(image_size=224)))
    dataset = ShardDataset(sorted(shard_dir.glob("*.tar")), task="any")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=workers)
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch.get("pixel_values", ()))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)  # preprocessing is per-sample work; one thread per worker process

    synth: dict[tuple[int, int], list[float]] = {}
    reads: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp)
        write_jpeg_shards(shards, args.n)
        for _ in range(args.repeats):
            for size in (64, 224):
                for workers in sorted({1, cores}):
                    n = args.n if size == 64 else args.n // 4
                    synth.setdefault((size, workers), []).append(synth_rate(size, n, workers))
            for workers in sorted({0, cores}):
                reads.setdefault(workers, []).append(read_rate(shards, workers))

    print(f"machine: {cores} cores; {args.repeats} repeats, medians")
    print("synthetic scenes (images/s)")
    for (size, workers), rates in sorted(synth.items()):
        print(f"  {size:>3} px, {workers} worker(s): {statistics.median(rates):8.0f}")
    print("shard read + decode + preprocess to 224x224 (samples/s)")
    for workers, rates in sorted(reads.items()):
        procs = max(workers, 1)
        rate = statistics.median(rates)
        label = "main process" if workers == 0 else f"{workers} workers"
        print(f"  {label:<13}: {rate:8.0f}   ({rate / procs:.0f} per core)")


if __name__ == "__main__":
    main()
