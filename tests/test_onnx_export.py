"""ONNX export of dual encoders: onnxruntime parity, the preprocessing card, int8, the CLI.

Models are tiny and of odd shapes (40 px images in 8 px patches, widths 36 / 24 with 3 heads,
a 13-token context) so that nothing passes by a lucky square or power-of-two size. The CLIP
export goes through ``imagefm export`` (int8 dynamic), the SigLIP one through ``export_onnx``
(int8 static with a calibration set); every check below reads one of those two exports.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter

import imagefm  # noqa: E402
from imagefm.config import ConfigError  # noqa: E402
from imagefm.convert.onnx_export import export_onnx  # noqa: E402
from imagefm.convert.onnx_quantize import Calibration  # noqa: E402
from imagefm.data.synthetic import generate  # noqa: E402
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer  # noqa: E402
from imagefm.processor import Processor  # noqa: E402
from imagefm.tokenizer import train_bpe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from onnx_client import client_pixels, client_tokens  # noqa: E402  (examples/, no imagefm)

SIZE, CONTEXT = 40, 13
CAPTIONS = ["A red circle, left of a BLUE star!", "two green squares", "빨간 별 그림",
            "a photo of a yellow triangle above a purple heart, on a striped background, "
            "drawn small", "an orange  cross", "the   big brown moon.", "A Pink Hexagon"]


def _tokenizer(kind: str) -> Any:
    records = generate("scenes", 40, seed=1, image_size=32, workers=1)
    texts = [c.text for r in records for c in r.captions] + CAPTIONS
    tokenizer = train_bpe(texts, 600, context_length=CONTEXT, min_frequency=1)
    if kind == "siglip":  # SigLIP's rules: no BOS, EOS appended, pad with EOS, canonicalised
        tokenizer = tokenizer.with_settings(bos_id=None, pad_id=tokenizer.eos_id,
                                            canonicalize=True)
    return tokenizer


def tiny_model(kind: str) -> DualEncoder:
    base = imagefm.preset("tiny" if kind == "clip" else "siglip-tiny")
    vision = dataclasses.replace(base.vision, image_size=SIZE, patch_size=8, width=36, heads=3,
                                 layers=1, mlp_dim=60)
    text = dataclasses.replace(base.text, context_length=CONTEXT, width=24, heads=3, layers=2,
                               mlp_dim=40)
    config = dataclasses.replace(base, vision=vision, text=text,
                                 embed_dim=20 if kind == "clip" else 36)
    tokenizer = _tokenizer(kind)
    model = DualEncoder(fit_text_to_tokenizer(config, tokenizer)).eval()
    with torch.no_grad():  # away from init values, so a dropped bias or scale would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny CLIP saved, then exported by the CLI with int8 dynamic and its zero-shot report."""
    from typer.testing import CliRunner

    from imagefm.cli import app

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("clip")
    model = tiny_model("clip")
    model.save_pretrained(root / "ckpt")
    result = CliRunner().invoke(app, ["export", str(root / "ckpt"), "--out", str(root / "onnx"),
                                      "--int8", "dynamic", "--eval-suite", "colour",
                                      "--eval-n", "11"])
    assert result.exit_code == 0, result.output
    return {"model": model, "dir": root / "onnx", "ckpt": root / "ckpt",
            "output": result.output, "kind": "clip"}


@pytest.fixture(scope="module")
def siglip_export(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SigLIP exported by ``export_onnx`` with int8 static, calibrated on 12 scenes."""
    torch.manual_seed(1)
    model = tiny_model("siglip")
    records = list(generate("scenes", 12, seed=2, image_size=48, workers=1))
    # One file that is not an image: skipped and counted, not a crash.
    calibration = Calibration([r.image for r in records] + [b"not an image"],
                              [c.text for r in records for c in r.captions], batch_size=4)
    out = tmp_path_factory.mktemp("siglip") / "onnx"
    written = export_onnx(model, out, int8="static", calibration=calibration)
    assert calibration.skips.skipped == {"undecodable image": 1}
    assert calibration.skips.seen == 13
    return {"model": model, "dir": out, "written": written, "kind": "siglip"}


@pytest.fixture(params=["clip", "siglip"])
def exported(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.getfixturevalue(f"{request.param}_export")


def _session(path: Path) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _images(n: int, seed: int) -> list[Any]:
    """Synthetic scenes at sizes that need resizing, some not square."""
    sizes = [(57, 31), (40, 40), (33, 90), (128, 128), (41, 39), (64, 48), (20, 25)]
    records = generate("scenes", n, seed=seed, image_size=64, workers=1)
    return [Image.open(io.BytesIO(r.image)).convert("RGB").resize(sizes[i % 7])
            for i, r in enumerate(records)]


# ---------------------------------------------------------------- parity
def test_embeddings_match_torch_for_batch_sizes_and_lengths(exported: dict[str, Any]) -> None:
    model, out = exported["model"], exported["dir"]
    image, text = _session(out / "image_encoder.onnx"), _session(out / "text_encoder.onnx")
    assert isinstance(image.get_inputs()[0].shape[0], str)  # a symbolic batch axis
    assert all(isinstance(d, str) for d in text.get_inputs()[0].shape)  # batch and sequence
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    longest = model.tokenizer.with_settings(padding="longest")
    for batch in (1, 7):
        pixels = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            expected = model.encode_image(pixels)
        got = image.run(None, {"pixel_values": pixels.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)
        for tokenizer in (model.tokenizer, longest):  # full context, then shorter sequences
            tokens = tokenizer(CAPTIONS[:batch])
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
            with torch.no_grad():
                expected = model.encode_text(ids, mask)
            got = text.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)
    assert longest(CAPTIONS[1:2])["input_ids"].shape[1] < CONTEXT  # the short case was short


def test_embeddings_are_unnormalised_as_encode_image(exported: dict[str, Any]) -> None:
    card = json.loads((exported["dir"] / "preprocess.json").read_text())
    assert card["embeddings"]["normalized"] is False
    out = _session(exported["dir"] / "image_encoder.onnx").run(
        None, {"pixel_values": np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE))
               .astype(np.float32)})[0]
    assert out.shape == (3, exported["model"].config.embed_dim)
    assert not np.allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-3)


# ---------------------------------------------------------------- the card, read by a client
def test_reference_client_reproduces_processor_and_logits(exported: dict[str, Any]) -> None:
    model, out = exported["model"], exported["dir"]
    card = json.loads((out / "preprocess.json").read_text())
    assert card["model_type"] == exported["kind"]
    assert card["image"]["resize"]["mode"] == ("shortest" if exported["kind"] == "clip"
                                               else "squash")
    images = _images(7, seed=3)
    pixels = np.stack([client_pixels(card, image) for image in images])
    tokens = client_tokens(card, out, CAPTIONS)
    # The client's inputs are imagefm's processor's, exactly.
    ours = Processor.for_model(model)(images=images, texts=CAPTIONS)
    np.testing.assert_allclose(pixels, ours["pixel_values"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(tokens["input_ids"], ours["input_ids"].numpy())
    np.testing.assert_array_equal(tokens["attention_mask"], ours["attention_mask"].numpy())
    assert (tokens["attention_mask"].sum(1) == CONTEXT).any()  # the long caption was truncated
    # And its logits, from the graphs and the card's scale and bias, are the model's.
    image = _session(out / card["graphs"]["image"]["file"]).run(None, {"pixel_values": pixels})[0]
    text = _session(out / card["graphs"]["text"]["file"]).run(None, tokens)[0]
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    logits = card["logits"]["logit_scale"] * image @ text.T + (card["logits"]["logit_bias"] or 0)
    with torch.no_grad():
        expected = model(ours["pixel_values"], ours["input_ids"], ours["attention_mask"])
    np.testing.assert_allclose(logits, expected.logits_per_image.numpy(), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- int8
def _float_matmuls_on_weights(path: Path) -> list[str]:
    """MatMul / Gemm nodes still multiplying by a float weight stored in the graph."""
    graph = onnx.load(str(path)).graph
    weights = {t.name for t in graph.initializer if len(t.dims) == 2}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
            and any(i in weights for i in n.input)]


def test_int8_graphs_are_quantised_and_keep_embeddings(exported: dict[str, Any]) -> None:
    out, kind = exported["dir"], exported["kind"]
    card = json.loads((out / "preprocess.json").read_text())
    assert card["int8"] == ("dynamic" if kind == "clip" else "static")
    expected_ops = {"MatMulInteger"} if kind == "clip" else {"QuantizeLinear", "DequantizeLinear"}
    inputs = {"image": {"pixel_values": np.stack([client_pixels(card, i)
                                                  for i in _images(7, seed=4)])},
              "text": client_tokens(card, out, CAPTIONS)}
    for graph in ("image", "text"):
        float_path = out / card["graphs"][graph]["file"]
        int8_path = out / card["graphs"][graph]["int8_file"]
        model = onnx.load(str(int8_path))
        assert expected_ops <= {n.op_type for n in model.graph.node}
        assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
        assert _float_matmuls_on_weights(float_path)  # the float graph had weights to quantise
        assert _float_matmuls_on_weights(int8_path) == []  # and none is left in float
        reference = _session(float_path).run(None, inputs[graph])[0]
        quantised = _session(int8_path).run(None, inputs[graph])[0]
        reference, quantised = torch.from_numpy(reference), torch.from_numpy(quantised)
        # Close in direction, and closer to its own float embedding than to any other input's:
        # int8 keeps what a search or zero-shot ranking reads.
        assert F.cosine_similarity(quantised, reference).min() > 0.98
        similarity = F.normalize(quantised, dim=-1) @ F.normalize(reference, dim=-1).T
        assert torch.equal(similarity.argmax(dim=1), torch.arange(7))


def test_static_int8_needs_calibration(tmp_path: Path) -> None:
    model = DualEncoder(imagefm.preset("tiny"))
    with pytest.raises(ConfigError, match="calibration"):
        export_onnx(model, tmp_path, int8="static")
    with pytest.raises(ConfigError, match="int8"):
        export_onnx(model, tmp_path, int8="int4")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_naflex_is_refused_in_one_line(tmp_path: Path) -> None:
    base = imagefm.preset("siglip-tiny")
    model = DualEncoder(base.replace(vision=dataclasses.replace(base.vision, naflex=True)))
    with pytest.raises(ConfigError, match="naflex"):
        export_onnx(model, tmp_path)


# ---------------------------------------------------------------- the command
def test_cli_reports_int8_zero_shot_cost(clip_export: dict[str, Any]) -> None:
    from imagefm.eval.suites import run_suite

    out = clip_export["dir"]
    report = json.loads((out / "int8_eval.json").read_text())
    (row,) = report["rows"]
    assert (row["name"], row["lang"], row["n"]) == ("colour", "en", 11)
    assert row["delta_top1"] == pytest.approx(row["int8_top1"] - row["fp32_top1"])
    assert report["int8"] == "dynamic"
    # The float graph's score is the PyTorch model's own on the same suite.
    model = clip_export["model"]
    torch_result = run_suite(model, Processor.for_model(model), "colour", "en", 11, 0)
    assert row["fp32_top1"] == pytest.approx(torch_result["top1"])
    assert "colour" in clip_export["output"] and "mean top-1 change" in clip_export["output"]
    for name in ("image_encoder.onnx", "text_encoder.onnx", "image_encoder.int8.onnx",
                 "text_encoder.int8.onnx", "preprocess.json", "tokenizer.json"):
        assert (out / name).is_file(), name


def test_cli_export_hf_still_works(clip_export: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app

    result = CliRunner().invoke(app, ["export", str(clip_export["ckpt"]), "--format", "hf",
                                      "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "clip"
