"""What caching a locked image tower's features saves: one lit-effnet training step (forward,
backward, AdamW) on pixels (the locked EfficientNet-Lite0 runs every step) against the same step
on cached features (``data.source=recipes`` with ``cache_image_features``).

    python benchmarks/bench_lit_cache.py [--batch 128] [--repeats 5] [--preset lit-effnet]

The two kinds of step alternate and the fastest of each is reported, so a neighbour's load on a
shared machine slows both alike instead of skewing the ratio. Needs the preset's tower packages
(pip install 'imagefm[effnet,e5]'); captions are real Tux Paint-style lengths (8 tokens).
"""

from __future__ import annotations

import argparse
import time

import torch

from imagefm.config import preset
from imagefm.losses import clip_loss
from imagefm.models.towers import PRESET_TOWERS, build_dual_encoder
from imagefm.train.config import StageConfig
from imagefm.train.stages import apply_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--preset", default="lit-effnet")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_dual_encoder(preset(args.preset), PRESET_TOWERS[args.preset])
    # configs/lit-effnet.yaml's stage: image tower locked, text locked but for its last layer.
    apply_stage(model, StageConfig(preset="lit", frozen=["text"], unlock_last_n={"text": 1}))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    size = model.config.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    with torch.no_grad():
        features = model.vision(pixels)
    text = model.tokenizer([f"a small picture of thing {i}" for i in range(args.batch)])

    def step(images: torch.Tensor) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, text["input_ids"], text["attention_mask"])
        loss = clip_loss(out.image_embeds.float(), out.text_embeds.float(), out.logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    model.train()
    times: dict[str, list[float]] = {"pixels": [], "cached features": []}
    for _ in range(args.repeats + 1):  # the first round warms up
        times["pixels"].append(step(pixels))
        times["cached features"].append(step(features))
    best = {name: min(values[1:]) for name, values in times.items()}
    for name, seconds in best.items():
        print(f"{name:16s} {seconds:7.3f} s/step  {args.batch / seconds:7.1f} samples/s")
    print(f"speed-up from caching: {best['pixels'] / best['cached features']:.1f}x "
          f"(batch {args.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
