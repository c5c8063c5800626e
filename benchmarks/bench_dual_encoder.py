"""Training-step and image-embedding throughput: imagefm vs open_clip vs transformers (sdpa).

The three models share one architecture (same shapes, same activation) and get the same inputs.
Runs are interleaved over several repeats so a noisy neighbour slows all three alike; medians and
ratios are printed. CPU by default; CUDA when present (``--device cuda``).

    python benchmarks/bench_dual_encoder.py --preset tiny --batch 64
    python benchmarks/bench_dual_encoder.py --preset small --batch 32 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import imagefm
from imagefm.config import DualEncoderConfig
from imagefm.losses import clip_loss
from imagefm.models.dual_encoder import DualEncoder


def build_open_clip(cfg: DualEncoderConfig) -> torch.nn.Module:
    import open_clip

    v, t = cfg.vision, cfg.text
    vision_cfg = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                      layers=v.layers, head_width=v.width // v.heads, mlp_ratio=v.mlp_dim / v.width)
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                    layers=t.layers, heads=t.heads, mlp_ratio=t.mlp_dim / t.width)
    return open_clip.CLIP(cfg.embed_dim, vision_cfg, text_cfg, quick_gelu=v.act == "quick_gelu")


def build_hf(cfg: DualEncoderConfig) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    v, t = cfg.vision, cfg.text
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu"}[v.act]
    config = CLIPConfig(
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.width,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           intermediate_size=v.mlp_dim, hidden_act=act),
        text_config=dict(vocab_size=t.vocab_size, max_position_embeddings=t.context_length,
                         hidden_size=t.width, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, intermediate_size=t.mlp_dim,
                         hidden_act=act),
        projection_dim=cfg.embed_dim)
    return _hf_sdpa(CLIPModel, config)


def _hf_sdpa(cls: type, config: object) -> torch.nn.Module:
    config._attn_implementation = "sdpa"  # the fastest attention transformers offers on CPU
    return cls(config)


# Each wrapper returns (image_features, text_features, logit_scale) for the same inputs.
def run_imagefm(m, pixels, ids, mask):
    return m.encode_image(pixels), m.encode_text(ids, mask), m.logit_scale


def run_open_clip(m, pixels, ids, mask):
    return m.encode_image(pixels), m.encode_text(ids), m.logit_scale


def run_hf(m, pixels, ids, mask):
    return (m.get_image_features(pixel_values=pixels),
            m.get_text_features(input_ids=ids, attention_mask=mask), m.logit_scale)


def _features(x):
    # transformers 5 may return an output object from get_*_features.
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def train_step(model, run, opt, pixels, ids, mask) -> None:
    img, txt, scale = run(model, pixels, ids, mask)
    img, txt = F.normalize(_features(img), dim=-1), F.normalize(_features(txt), dim=-1)
    loss = clip_loss(img, txt, scale.exp())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def embed_images(model, run, pixels, precision: str = "fp32") -> None:
    autocast = (torch.autocast(pixels.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        if run is run_hf:
            _features(model.get_image_features(pixel_values=pixels))
        else:
            model.encode_image(pixels)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], iters: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="steps per timed repeat")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--only", default="imagefm,open_clip,transformers")
    parser.add_argument("--precision", default="fp32",
                        help="image embedding in fp32 and/or bf16 (bfloat16 autocast), e.g. "
                             "fp32,bf16: each measured in the same interleaved repeats")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = imagefm.preset(args.preset)
    builders = {"imagefm": (lambda: DualEncoder(cfg), run_imagefm),
                "open_clip": (lambda: build_open_clip(cfg), run_open_clip),
                "transformers": (lambda: build_hf(cfg), run_hf)}
    names = [n for n in args.only.split(",") if n in builders]
    torch.manual_seed(0)
    b, dev = args.batch, args.device
    pixels = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, device=dev)
    ids = torch.randint(1, cfg.text.vocab_size - 1, (b, cfg.text.context_length), device=dev)
    ids[:, -1] = cfg.text.vocab_size - 1  # EOS = largest id, so argmax pooling is well defined
    mask = torch.ones_like(ids)

    models, opts = {}, {}
    for name in names:
        build, _ = builders[name]
        models[name] = build().to(dev).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
        params = sum(p.numel() for p in models[name].parameters())
        print(f"{name:<13} {params:,} parameters")

    precisions = args.precision.split(",")
    embeds = [f"embed {p}" if p != "fp32" else "embed" for p in precisions]
    results: dict[str, dict[str, list[float]]] = {
        n: {key: [] for key in ("train", *embeds)} for n in names}
    for name in names:  # warm-up
        run = builders[name][1]
        train_step(models[name], run, opts[name], pixels, ids, mask)
        for precision in precisions:
            embed_images(models[name], run, pixels, precision)
    for _ in range(args.repeats):
        for name in names:
            run, m, opt = builders[name][1], models[name], opts[name]
            results[name]["train"].append(
                timed(lambda m=m, run=run, opt=opt: train_step(m, run, opt, pixels, ids, mask),
                      args.iters, dev))
            for precision, key in zip(precisions, embeds, strict=True):
                results[name][key].append(
                    timed(lambda m=m, run=run, p=precision: embed_images(m, run, pixels, p),
                          args.iters, dev))

    print(f"\npreset {args.preset}, batch {b}, device {dev}, threads {torch.get_num_threads()}, "
          f"{args.repeats} repeats x {args.iters} iters (medians)")
    columns = ["train", *embeds]
    print(f"{'':<13} {'train samples/s':>16}"
          + "".join(f" {key + ' images/s':>20}" for key in embeds))
    speeds = {name: {key: b / statistics.median(results[name][key]) for key in columns}
              for name in names}
    for name in names:
        print(f"{name:<13} {speeds[name]['train']:>16.1f}"
              + "".join(f" {speeds[name][key]:>20.1f}" for key in embeds))
    if "imagefm" in speeds:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            models["imagefm"].encode_image(pixels[:1])
        flops = counter.get_total_flops()
        print(f"imagefm image tower: {flops / 1e6:.1f} MFLOP per image (forward, 2 per "
              f"multiply-add), embedding at "
              + ", ".join(f"{flops * speeds['imagefm'][key] / 1e9:.1f} GFLOP/s ({key})"
                          for key in embeds))
        for name in names:
            if name != "imagefm":
                print(f"imagefm / {name:<13} "
                      + "   ".join(f"{key} {speeds['imagefm'][key] / speeds[name][key]:.2f}x"
                                 for key in columns))
    if "embed" in embeds and "embed bf16" in embeds:
        for name in names:
            print(f"{name:<13} bf16 / fp32 embedding: "
                  f"{speeds[name]['embed bf16'] / speeds[name]['embed']:.2f}x")


if __name__ == "__main__":
    main()
