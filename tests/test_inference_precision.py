"""``precision="bf16"``: inference under bfloat16 autocast, in the embedding helpers, the index
and the server: the model really runs in bf16, its weights stay fp32 (the index fingerprint
still matches), and embeddings stay within a small cosine distance of fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_search_fixtures import make_colour_folder, tiny_checkpoint
from test_text_padding import TEXT, model_with, padded_batch

from imagefm.apps.zeroshot import embed_pixels, encode_tokens
from imagefm.config import ConfigError, TextConfig


def autocast_seen(module: torch.nn.Module) -> list[bool]:
    """Whether CPU autocast was on at each later call of ``module``."""
    seen: list[bool] = []
    module.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    return seen


def test_bf16_runs_under_autocast_and_stays_close_to_fp32():
    model = model_with(TextConfig(**TEXT))
    pixels = torch.randn(4, 3, 16, 16)
    batch = padded_batch([3, 5, 4])
    vision, text = autocast_seen(model.vision), autocast_seen(model.text)
    images = {p: embed_pixels(model, pixels, p) for p in ("fp32", "bf16")}
    texts = {p: encode_tokens(model, batch, p) for p in ("fp32", "bf16")}
    assert vision == [False, True] and text == [False, True]
    for pair in (images, texts):
        assert pair["bf16"].dtype == torch.float32  # vectors come back as fp32
        assert not torch.equal(pair["bf16"], pair["fp32"])  # it did compute in bf16
        assert (pair["bf16"] * pair["fp32"]).sum(-1).min() > 0.999
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ConfigError, match="precision"):
        embed_pixels(model, pixels, "fp16")


def test_index_and_server_embed_in_bf16_when_asked(tmp_path):
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imagefm.apps.search import Index
    from imagefm.serve import ServeSettings, create_app

    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    root = tmp_path / "photos"
    make_colour_folder(root)
    fp32 = Index.build(root, tmp_path / "fp32", checkpoint, workers=0)
    bf16 = Index.build(root, tmp_path / "bf16", checkpoint, workers=0, precision="bf16")
    seen = autocast_seen(bf16.model.vision)
    vectors = {name: index.embed_images([root / "red.png"])[0]
               for name, index in (("fp32", fp32), ("bf16", bf16))}
    assert seen == [True]
    assert 0.999 < float(vectors["fp32"] @ vectors["bf16"]) < 1.0
    # Reopened with the same weights (fp32 on disk), the fingerprint check passes.
    assert Index.open(tmp_path / "bf16", precision="bf16").search("red", k=1)
    with pytest.raises(ConfigError, match="precision"):
        Index.open(tmp_path / "bf16", precision="half")
    with pytest.raises(ConfigError, match="precision"):
        Index.build(root, tmp_path / "half", checkpoint, workers=0, precision="half")
    assert not (tmp_path / "half").exists()  # refused before anything was written

    answers = {}
    for precision in ("fp32", "bf16"):
        app = create_app(fp32.model, settings=ServeSettings(model_name="m",
                                                            precision=precision))
        with TestClient(app) as client:
            reply = client.post("/v1/embeddings", json={"input": ["a red car", "빨간 자동차"]})
        assert reply.status_code == 200, reply.text
        answers[precision] = np.array([row["embedding"] for row in reply.json()["data"]])
    cosines = (answers["fp32"] * answers["bf16"]).sum(-1)
    assert cosines.min() > 0.999 and not np.array_equal(answers["fp32"], answers["bf16"])
    with pytest.raises(ValueError, match="precision"):
        ServeSettings(precision="fp16")


def test_bf16_on_a_gpu_without_bfloat16_is_refused_up_front(monkeypatch):
    from imagefm.apps.zeroshot import check_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="no bfloat16"):
        check_precision("bf16", "cuda")
    check_precision("fp32", "cuda")
    check_precision("bf16", "cpu")
