"""GradCache gives exactly the full-batch gradients (float64, every parameter, clip and siglip)."""

from __future__ import annotations

import pytest
import torch

from imagefm.config import preset
from imagefm.models.dual_encoder import DualEncoder
from imagefm.train.gradcache import gradcache_backward, split_batch
from imagefm.train.tasks import ContrastiveTask

SMALL = {"layers": 2, "width": 32, "heads": 2, "mlp_dim": 64}


def tiny(name: str) -> DualEncoder:
    base = preset(name)
    vision = base.vision.__class__(**{**base.vision.__dict__, **SMALL, "image_size": 16})
    text = base.text.__class__(**{**base.text.__dict__, **SMALL, "vocab_size": 64,
                                  "context_length": 8})
    return DualEncoder(base.replace(vision=vision, text=text, embed_dim=32))


def batch(rows: int, dtype: torch.dtype = torch.float64) -> dict:
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(rows, 8, dtype=torch.long)
    mask[::2, 6:] = 0  # some padded texts, so the mask path is exercised too
    return {"pixel_values": torch.randn(rows, 3, 16, 16, generator=generator, dtype=dtype),
            "input_ids": torch.randint(1, 64, (rows, 8), generator=generator),
            "attention_mask": mask}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name, loss", [("tiny", "clip"), ("siglip-tiny", "siglip"),
                                              ("siglip-tiny", "clip")])
@pytest.mark.parametrize("chunk", [1, 4])
def test_gradcache_equals_full_batch_gradients(model_name, loss, chunk):
    torch.manual_seed(0)
    model = tiny(model_name).double()
    with torch.no_grad():  # a non-trivial bias and scale, so their gradients matter
        model.logit_scale.fill_(2.0)
        if model.logit_bias is not None:
            model.logit_bias.fill_(-1.5)
    task = ContrastiveTask(loss)
    data = batch(6)  # 6 rows in chunks of 4: an uneven last chunk

    full_loss, _ = task.loss(model, data)
    full_loss.backward()
    expected = gradients(model)
    model.zero_grad(set_to_none=True)

    cached_loss, metrics = gradcache_backward(model, task, data, chunk)
    got = gradients(model)

    torch.testing.assert_close(cached_loss, full_loss.detach(), rtol=1e-12, atol=1e-12)
    assert set(got) == set(expected) == {n for n, _ in model.named_parameters()}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    assert expected["logit_scale"].abs() > 0
    if loss == "clip" and model.logit_bias is not None:  # the softmax loss ignores a bias
        assert got["logit_bias"].item() == 0.0
    assert float(metrics["logit_scale"]) == pytest.approx(torch.e**2)


def test_split_batch_keeps_rows_together():
    data = {"x": torch.arange(5), "names": list("abcde"), "flag": True}
    chunks = split_batch(data, 2)
    assert [c["x"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [c["names"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert all(c["flag"] is True for c in chunks)
    with pytest.raises(ValueError, match="different numbers of rows"):
        split_batch({"x": torch.arange(5), "y": torch.arange(4)}, 2)
