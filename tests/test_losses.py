"""Tests for imagefm.losses: written-out formulas, open_clip parity, real multi-process runs."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from imagefm.losses import clip_loss, get_loss, siglip_loss

DTYPE = torch.float64


def _inputs(batch: int = 5, dim: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised features plus scale and bias, all leaves that require grad (float64)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=DTYPE), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=DTYPE), dim=-1)
    scale = torch.tensor(7.5, dtype=DTYPE)
    bias = torch.tensor(-2.0, dtype=DTYPE)
    return tuple(t.requires_grad_() for t in (image, text, scale, bias))


def naive_clip(image, text, scale):
    """InfoNCE written out: -log softmax of the matching pair, both directions, averaged."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        image_to_texts = [torch.exp(scale * torch.dot(image[i], text[j])) for j in range(n)]
        text_to_images = [torch.exp(scale * torch.dot(text[i], image[j])) for j in range(n)]
        total = total - torch.log(image_to_texts[i] / sum(image_to_texts))
        total = total - torch.log(text_to_images[i] / sum(text_to_images))
    return total / (2 * n)


def naive_siglip(image, text, scale, bias):
    """Sigmoid loss written out: sum over all pairs of log(1 + exp(-label * logit)), / batch."""
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            total = total + torch.log1p(torch.exp(-label * logit))
    return total / n


def _assert_value_and_grads_match(ours, reference, inputs):
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    ours_grads = torch.autograd.grad(ours, inputs)
    reference_grads = torch.autograd.grad(reference, inputs)
    for ours_grad, reference_grad in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-10, atol=1e-12)


def test_clip_loss_matches_written_out_formula():
    image, text, scale, _ = _inputs()
    _assert_value_and_grads_match(
        clip_loss(image, text, scale), naive_clip(image, text, scale), (image, text, scale)
    )


def test_siglip_loss_matches_written_out_formula():
    image, text, scale, bias = _inputs()
    _assert_value_and_grads_match(
        siglip_loss(image, text, scale, bias),
        naive_siglip(image, text, scale, bias),
        (image, text, scale, bias),
    )


def test_single_process_losses_match_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text, scale, bias = _inputs(batch=8, dim=6, seed=3)
    torch.testing.assert_close(
        clip_loss(image, text, scale), open_clip_loss.ClipLoss()(image, text, scale)
    )
    torch.testing.assert_close(
        siglip_loss(image, text, scale, bias),
        open_clip_loss.SigLipLoss()(image, text, scale, bias),
    )


def test_perfect_alignment_gives_near_zero_clip_loss():
    # Orthonormal matching pairs and a large temperature: every softmax is (almost) one-hot.
    features = torch.eye(4, dtype=DTYPE)
    loss = clip_loss(features, features, torch.tensor(100.0, dtype=DTYPE))
    assert loss.item() < 1e-30
    swapped = clip_loss(features, features.flip(0), torch.tensor(100.0, dtype=DTYPE))
    assert swapped.item() > 50


def test_without_process_group_auto_runs_single_process_and_explicit_request_fails():
    image, text, scale, bias = _inputs()
    torch.testing.assert_close(
        clip_loss(image, text, scale), clip_loss(image, text, scale, distributed=False)
    )
    with pytest.raises(RuntimeError, match="process group"):
        clip_loss(image, text, scale, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        siglip_loss(image, text, scale, bias, distributed=True)


def test_mismatched_shapes_are_refused():
    image, text, scale, bias = _inputs()
    with pytest.raises(ValueError, match="same shape"):
        clip_loss(image, text[:-1], scale)
    with pytest.raises(ValueError, match="same shape"):
        siglip_loss(image[0], text[0], scale, bias)


def test_get_loss_by_name():
    assert get_loss("clip") is clip_loss
    assert get_loss("siglip") is siglip_loss
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("triplet")  # type: ignore[arg-type]


# --- real multi-process runs (gloo on 127.0.0.1) -------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_losses_match_global_batch_under_ddp_averaging(world_size, tmp_path):
    import _dist_worker as worker

    mp.spawn(worker.run_rank, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    model = worker.TinyDualEncoder()
    images, texts = worker.global_batch()
    for case, options in worker.CASES.items():
        expected_loss, expected_grads = worker.loss_and_grads(
            model, images, texts, case, distributed=False
        )
        rank_losses = torch.stack([r[case]["loss"] for r in ranks])
        # Every rank holds the same averaged gradients, as after a DDP all-reduce.
        averaged_grads = ranks[0][case]["grads"]
        for other in ranks[1:]:
            for name, grad in other[case]["grads"].items():
                torch.testing.assert_close(grad, averaged_grads[name], rtol=0, atol=1e-12)

        torch.testing.assert_close(rank_losses.mean(), expected_loss, rtol=1e-9, atol=1e-9)
        if options.get("local_loss") is False:  # the full matrix: identical on every rank
            torch.testing.assert_close(
                rank_losses, expected_loss.expand(world_size), rtol=1e-9, atol=1e-9
            )
        else:  # local rows only: ranks really differ, their mean is the global loss
            assert rank_losses.std() > 1e-6, case

        for name, expected in expected_grads.items():
            if options.get("gather_with_grad") is False and "tower" in name:
                # Documented: detached gathers leave tower gradients 1/world_size of the global.
                expected = expected / world_size
            if options["loss"] == "clip" and name == "logit_bias":
                assert averaged_grads[name].item() == 0.0  # CLIP has no bias term
                continue
            assert expected.abs().max() > 1e-6, (case, name)  # the comparison is not vacuous
            torch.testing.assert_close(
                averaged_grads[name], expected, rtol=1e-6, atol=1e-9, msg=f"{case}: {name}"
            )
