"""Training throughput and peak memory: imagefm's Trainer step against open_clip's, same config.

Both sides train the same architecture (a preset's shapes) on the same random batch with the CLIP
loss, AdamW, gradient clipping at 1.0 and the same precision (bf16 autocast by default):

* imagefm: ``Trainer.train_step`` (the step every ``imagefm train`` run takes: autocast, loss,
  backward, clip, optimizer, scheduler, logit-scale clamp, metrics);
* open_clip: its training loop's step (``open_clip.CLIP`` + ``open_clip.loss.ClipLoss`` under
  autocast, backward, clip, AdamW, logit-scale clamp), as ``open_clip_train`` runs it.

Repeats are interleaved so a noisy neighbour slows both alike; medians and the ratio are printed.
Peak memory: CUDA's allocator peak per side; on the CPU, each side runs again in a child process
and reports the growth of its peak resident memory over the step. On CUDA, model FLOPs
utilisation (MFU) counts the step's FLOPs with ``torch.utils.flop_counter`` against the GPU's
dense bf16 peak (``--peak-tflops``, 989 for an H100 SXM).

    python benchmarks/bench_train.py --preset tiny --batch 128
    python benchmarks/bench_train.py --preset small --batch 64 --repeats 5
    python benchmarks/bench_train.py --preset base --batch 256 --device cuda --compile
    python benchmarks/bench_train.py ... --optimizer foreach --host-sync step   # the old step
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

# Benchmarks share their helpers; run as scripts, their folder is on sys.path.
from bench_dual_encoder import sync, timed

import imagefm
from imagefm.config import DualEncoderConfig
from imagefm.models.dual_encoder import DualEncoder

Step = Callable[[], None]


def random_batch(cfg: DualEncoderConfig, batch: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size, t = cfg.vision.image_size, cfg.text
    ids = torch.randint(1, t.vocab_size - 1, (batch, t.context_length), generator=g)
    ids[:, -1] = t.vocab_size - 1  # EOS = the largest id, as CLIP's argmax pooling expects
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device),
            "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def imagefm_step(cfg: DualEncoderConfig, batch: dict, args: argparse.Namespace) -> Step:
    from imagefm.train import ContrastiveTask, Trainer
    from imagefm.train.config import TrainConfig

    config = TrainConfig.from_dict({
        "run": {"output_dir": "/tmp/imagefm-bench-train", "device": args.device,
                "progress": False, "tensorboard": False},
        "optim": {"lr": 1e-4, "grad_clip": 1.0, "warmup_steps": 0,
                  "implementation": args.optimizer},
        "train": {"steps": 10**9, "precision": args.precision, "host_sync": args.host_sync},
        "model": {"compile": args.compile},
    })
    trainer = Trainer(DualEncoder(cfg), ContrastiveTask("clip"), config, [batch])
    return lambda: trainer.train_step(batch)


def open_clip_step(cfg: DualEncoderConfig, batch: dict, args: argparse.Namespace) -> Step:
    from bench_dual_encoder import build_open_clip
    from open_clip.loss import ClipLoss

    model = build_open_clip(cfg).to(args.device).train()
    if args.compile:
        model = torch.compile(model)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    dtype = None if args.precision == "fp32" else torch.bfloat16
    device_type = torch.device(args.device).type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            image, text, scale = model(batch["pixel_values"], batch["input_ids"])
            loss = loss_fn(image, text, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            getattr(model, "_orig_mod", model).logit_scale.clamp_(0, math.log(100))
        loss.item()  # open_clip_train reads the loss every step too

    return step


SIDES = {"imagefm": imagefm_step, "open_clip": open_clip_step}


def step_flops(cfg: DualEncoderConfig, batch: int, device: str) -> float:
    """FLOPs of one forward + backward of the model at this batch (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = DualEncoder(cfg).to(device)
    inputs = random_batch(cfg, batch, device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = model(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
        (out.image_embeds.float().sum() + out.text_embeds.float().sum()).backward()
    return float(counter.get_total_flops())


def profile_steps(step: Step, count: int, device: str, rows: int = 25) -> None:
    """Where a step's time goes: the ops with the most self time over ``count`` steps (GPU
    kernels on CUDA, CPU ops otherwise), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(count):
            step()
        sync(device)
    table = prof.key_averages()
    print(f"\nprofile of {count} imagefm steps (self time, top {rows}):")
    print(table.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                      row_limit=rows))


def child_memory(args: argparse.Namespace, side: str) -> dict[str, float]:
    """Run one side alone in a child process; its peak RSS growth over the training steps."""
    command = [sys.executable, __file__, "--child", side, "--preset", args.preset,
               "--batch", str(args.batch), "--device", args.device, "--precision", args.precision,
               "--threads", str(args.threads), "--optimizer", args.optimizer,
               "--host-sync", args.host_sync] + (["--compile"] if args.compile else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def run_child(args: argparse.Namespace) -> None:
    cfg = imagefm.preset(args.preset)
    batch = random_batch(cfg, args.batch, args.device)
    step = SIDES[args.child](cfg, batch, args)
    before = current_rss_mb()  # the peak so far may be import-time; growth counts from now
    for _ in range(3):
        step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": after, "step_growth_mb": after - before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--optimizer", default="auto", choices=("auto", "fused", "foreach"),
                        help="imagefm's AdamW kernel (optim.implementation)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many imagefm steps (top ops by self time)")
    parser.add_argument("--host-sync", default="auto", choices=("auto", "step", "log"),
                        help="imagefm's train.host_sync (log: no read-back in the step)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for MFU (H100 SXM: 989)")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory children")
    parser.add_argument("--only", default="imagefm,open_clip")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return run_child(args)

    cfg = imagefm.preset(args.preset)
    names = [n for n in args.only.split(",") if n in SIDES]
    batch = random_batch(cfg, args.batch, args.device)
    steps, peaks = {}, {}
    for name in names:
        torch.manual_seed(0)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        steps[name] = SIDES[name](cfg, batch, args)
        for _ in range(args.warmup):
            steps[name]()
        if args.device.startswith("cuda"):
            sync(args.device)
            peaks[name] = {"peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(timed(steps[name], args.iters, args.device))
    if args.profile and "imagefm" in steps:
        profile_steps(steps["imagefm"], args.profile, args.device)
    if not args.device.startswith("cuda") and not args.no_memory:
        del steps  # the children measure memory; free this process's models first
        peaks = {name: child_memory(args, name) for name in names}

    print(f"\npreset {args.preset}, batch {args.batch}, {args.precision}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}"
          f", threads {torch.get_num_threads()}, compile {args.compile}, "
          f"{args.repeats} repeats x {args.iters} steps (medians)")
    flops = step_flops(cfg, args.batch, args.device) if args.device.startswith("cuda") else None
    speeds = {}
    for name in names:
        seconds = statistics.median(times[name])
        speeds[name] = args.batch / seconds
        line = f"{name:<10} {speeds[name]:>10.1f} samples/s"
        memory = peaks.get(name, {})
        if "peak_mb" in memory:
            line += f"   peak memory {memory['peak_mb']:,.0f} MiB"
        elif "step_growth_mb" in memory:
            line += (f"   peak RSS {memory['peak_rss_mb']:,.0f} MiB "
                     f"(+{memory['step_growth_mb']:,.0f} MiB in the step)")
        if flops:
            line += f"   MFU {flops / seconds / (args.peak_tflops * 1e12):.1%}"
        print(line)
    if "imagefm" in speeds and "open_clip" in speeds:
        print(f"imagefm / open_clip: {speeds['imagefm'] / speeds['open_clip']:.2f}x")


if __name__ == "__main__":
    main()
