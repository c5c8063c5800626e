"""What int8 ONNX costs and buys: zero-shot top-1, file size and CPU latency, fp32 vs int8.

For each int8 mode (dynamic, static) the model is exported (``export_onnx``; static is calibrated
on synthetic scenes with their captions, as ``imagefm export --int8 static`` does without
``--calibration``), then:

* zero-shot top-1 of the fp32 and int8 graphs on the synthetic suites (``compare_int8``: the
  same images and prompts through onnxruntime; the difference is the quantisation alone);
* the sizes of the graph files;
* the image graph's latency (onnxruntime, one thread, median of ``--repeats`` runs) at batch 1
  and ``--batch``.

    python benchmarks/onnx_int8.py runs/quickstart/model
    python benchmarks/onnx_int8.py runs/quickstart/model --modes dynamic --suites colour,shape \
        --n 300 --json int8.json

Load average is printed: on a shared machine compare the fp32/int8 ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def latency_ms(path: Path, batch: int, size: int, repeats: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
    session.run(None, {"pixel_values": pixels})  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"pixel_values": pixels})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def run_mode(model: Any, mode: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from imagefm.convert.onnx_export import export_onnx
    from imagefm.convert.onnx_quantize import calibration_from_records
    from imagefm.data.synthetic import generate
    from imagefm.eval.onnx_int8 import compare_int8

    calibration = None
    if mode == "static":
        records = generate("scenes", args.calibration_n, seed=1, image_size=model.card.image_size,
                           workers=1)
        calibration = calibration_from_records(records, args.calibration_n)
    start = time.perf_counter()
    written = export_onnx(model, out, int8=mode, calibration=calibration)
    export_s = time.perf_counter() - start
    result = compare_int8(out, suites=args.suites.split(","), langs=args.langs.split(","),
                          n=args.n, seed=args.seed, threads=1)
    size = model.card.image_size
    result["export_s"] = round(export_s, 1)
    result["bytes"] = {name: os.path.getsize(written[name]) for name in
                       ("image_encoder", "text_encoder", "image_encoder_int8",
                        "text_encoder_int8")}
    result["image_latency_ms"] = {
        f"{graph}_batch{b}": round(latency_ms(written[graph], b, size, args.repeats), 2)
        for graph in ("image_encoder", "image_encoder_int8") for b in (1, args.batch)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a dual encoder checkpoint (anything imagefm.load reads)")
    parser.add_argument("--modes", default="dynamic,static")
    parser.add_argument("--suites", default="colour,shape,heldout")
    parser.add_argument("--langs", default="en")
    parser.add_argument("--n", type=int, default=200, help="images per suite and language")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import imagefm
    from imagefm.eval.onnx_int8 import format_int8_table

    print(f"load average at start: {os.getloadavg()}")
    model = imagefm.load(args.model)
    results = {}
    with tempfile.TemporaryDirectory(prefix="imagefm-onnx-int8-") as scratch:
        for mode in args.modes.split(","):
            result = run_mode(model, mode, Path(scratch) / mode, args)
            results[mode] = result
            print(f"\n== int8 {mode} (export {result['export_s']} s)")
            print(format_int8_table(result))
            print("bytes:", json.dumps(result["bytes"]))
            print("image graph latency, ms:", json.dumps(result["image_latency_ms"]))
    print(f"\nload average at end: {os.getloadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": args.model, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
