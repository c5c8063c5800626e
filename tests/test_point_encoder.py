"""The Point-BERT-style point tower, the point cloud–text model, ULIP's triplet loss, the
shapes3d data source and a tiny training run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("trimesh")

import imagefm  # noqa: E402
from imagefm.config import BertConfig, ConfigError  # noqa: E402
from imagefm.eval.points import (  # noqa: E402
    description_retrieval,
    evaluate_points,
    plot_robustness,
)
from imagefm.eval.retrieval import retrieval_metrics  # noqa: E402
from imagefm.losses import clip_loss  # noqa: E402
from imagefm.models.dual_encoder import DualEncoderOutput  # noqa: E402
from imagefm.models.point_encoder import (  # noqa: E402
    PointEncoder,
    PointEncoderConfig,
    PointTextConfig,
    PointTextModel,
    farthest_point_sample,
    group_points,
)
from imagefm.train.config import MODEL_PRESETS, load_config  # noqa: E402
from imagefm.train.data import get_data_source  # noqa: E402
from imagefm.train.distributed import DistInfo  # noqa: E402
from imagefm.train.launch import run  # noqa: E402
from imagefm.train.points import PointTripletTask, build_point_model  # noqa: E402
from imagefm.train.tasks import ContrastiveTask  # noqa: E402

TINY_POINT = PointEncoderConfig(num_points=128, num_groups=8, group_size=8, width=32, layers=1,
                                heads=2, mlp_dim=64)


def tiny_model(**changes) -> PointTextModel:
    config = PointTextConfig(point=TINY_POINT, text=BertConfig(vocab_size=50, width=32, layers=1,
                                                               heads=2, mlp_dim=64,
                                                               context_length=16),
                             embed_dim=16, **changes)
    return PointTextModel(config).eval()


def test_farthest_point_sampling_spreads_out():
    line = torch.arange(10.0).reshape(1, 10, 1).expand(1, 10, 3).contiguous()
    # Start at point 0; the farthest is 9; then the middle (4 or 5, the first of the tie).
    assert farthest_point_sample(line, 3).tolist() == [[0, 9, 4]]
    assert farthest_point_sample(line, 20).shape == (1, 10)


def test_groups_are_nearest_neighbours_relative_to_their_centre():
    torch.manual_seed(0)
    points = torch.cat([torch.rand(2, 50, 3), torch.rand(2, 50, 3)], dim=-1)
    centres, groups = group_points(points, 4, 5)
    assert centres.shape == (2, 4, 3) and groups.shape == (2, 4, 5, 6)
    # The nearest neighbour of a centre is itself: relative xyz 0, its own colour.
    assert groups[:, :, 0, :3].abs().max() == 0
    distances = groups[..., :3].norm(dim=-1)
    assert (distances[..., 1:] >= distances[..., :-1] - 1e-6).all()  # sorted by distance
    absolute = groups[..., :3] + centres.unsqueeze(2)
    for b, g, k in ((0, 1, 3), (1, 3, 4)):
        row = (points[b, :, :3] - absolute[b, g, k]).norm(dim=-1).argmin()
        torch.testing.assert_close(points[b, row, 3:], groups[b, g, k, 3:])


def test_point_encoder_shape_and_order_invariance():
    torch.manual_seed(0)
    encoder = PointEncoder(TINY_POINT).eval()
    points = torch.rand(3, 128, 6)
    out = encoder(points)
    assert out.shape == (3, 2 * TINY_POINT.width)
    # FPS starts at point 0; any reordering of the others leaves the output unchanged.
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(127) + 1])
    torch.testing.assert_close(encoder(points[:, order]), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="points must be"):
        encoder(torch.rand(2, 128, 3))


def test_model_output_follows_the_dual_encoder_contract():
    torch.manual_seed(0)
    model = tiny_model(image_width=12)
    points, ids = torch.rand(4, 128, 6), torch.randint(1, 50, (4, 7))
    out = model(points, ids, torch.ones_like(ids), image_features=torch.randn(4, 12))
    assert isinstance(out, DualEncoderOutput)
    for embeds in (out.image_embeds, out.text_embeds, out.render_embeds):
        assert embeds.shape == (4, 16)
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))
    expected = model.logit_scale.exp() * out.image_embeds @ out.text_embeds.t()
    torch.testing.assert_close(out.logits_per_image, expected)
    assert model.media_key == "points" and model.architecture == "point_clip"
    # Precomputed text-tower features give the same embedding as the token ids.
    features = model.text(ids, torch.ones_like(ids))
    torch.testing.assert_close(model.encode_text(features), model.encode_text(ids))


def test_contrastive_and_triplet_losses():
    torch.manual_seed(0)
    model = tiny_model(image_width=12)
    batch = {"points": torch.rand(6, 128, 6), "input_ids": torch.randint(1, 50, (6, 5)),
             "image_features": torch.randn(6, 12)}
    out = model(batch["points"], batch["input_ids"], image_features=batch["image_features"])
    pair, _ = ContrastiveTask("clip").loss(model, batch)  # reads model.media_key
    torch.testing.assert_close(pair, clip_loss(out.image_embeds, out.text_embeds,
                                               out.logit_scale))
    total, metrics = PointTripletTask("clip", image_weight=0.5).loss(model, batch)
    image = clip_loss(out.image_embeds, out.render_embeds, out.logit_scale)
    torch.testing.assert_close(total, pair + 0.5 * image)
    assert float(metrics["loss_point_image"]) == pytest.approx(image.item(), rel=1e-5)
    without = {k: v for k, v in batch.items() if k != "image_features"}
    torch.testing.assert_close(PointTripletTask("clip").loss(model, without)[0], pair)


def test_locked_text_tower_and_config_checks():
    model = tiny_model(lock_text=True)
    model.train()
    assert not model.text.training and model.points.training
    ids = torch.randint(1, 50, (2, 5))
    emb = model.encode_text(ids)
    emb.sum().backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.text_proj.weight.grad is not None
    with pytest.raises(ConfigError, match="point.in_channels"):
        PointEncoderConfig(in_channels=4)
    with pytest.raises(ConfigError, match="unknown key"):
        PointTextConfig.from_dict({"point": {"groups": 3}})


def test_save_and_load_round_trip(tmp_path):
    model = build_point_model("point-clip-tiny", pretrained=False).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = imagefm.load(tmp_path / "m")
    assert type(loaded) is PointTextModel and loaded.config == model.config
    batch = loaded.tokenizer(["a red cube", "빨간 정육면체"])
    points = torch.rand(2, 256, 6)
    torch.testing.assert_close(loaded(points, **batch).logits_per_image,
                               model(points, **batch).logits_per_image)
    assert {"point-clip-tiny", "point-clip-e5"} <= set(MODEL_PRESETS)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from imagefm.data.synthetic.shapes3d import write_shapes3d

    root = tmp_path_factory.mktemp("shapes3d")
    write_shapes3d(root, 40, seed=0, image_size=24, test_fraction=0.25)
    return root


def test_shapes3d_source_batches(shapes):
    config = load_config(None, ["model.preset=point-clip-tiny", "data.source=shapes3d",
                                f"data.path={shapes}", "data.batch_size=8",
                                "data.options={num_points: 64, dense_points: 256}"])
    model = build_point_model("point-clip-tiny", pretrained=False)
    make_loader = get_data_source("shapes3d")(config, model, DistInfo())
    first = list(make_loader(0))
    assert len(first) == len(make_loader.records) // 8
    batch = first[0]
    assert batch["points"].shape == (8, 64, 6)
    assert batch["image_features"].shape == (8, 192)  # the tiny preset's 8x8-pixel "tower"
    assert batch["input_ids"].shape[0] == 8 and "attention_mask" in batch
    again = next(iter(make_loader(0)))
    torch.testing.assert_close(again["points"], batch["points"])  # deterministic per epoch
    assert not torch.equal(next(iter(make_loader(1)))["points"], batch["points"])
    bad = load_config(None, ["model.preset=point-clip-tiny", "data.source=shapes3d",
                             f"data.path={shapes}", "data.options={rotat: z}"])
    with pytest.raises(ConfigError, match="rotat"):
        get_data_source("shapes3d")(bad, model, DistInfo())


def test_tiny_training_run_loss_falls(shapes, tmp_path):
    config = load_config(None, [
        "model.preset=point-clip-tiny", "task.name=ulip", "data.source=shapes3d",
        f"data.path={shapes}", "data.batch_size=10",
        "data.options={num_points: 64, dense_points: 256}",
        "model.config={point: {num_points: 64, num_groups: 8, group_size: 8, layers: 1}}",
        "train.steps=24", "optim.lr=2e-3", "optim.warmup_steps=2", "optim.weight_decay=0",
        f"run.output_dir={tmp_path}", "run.name=tiny", "run.progress=false",
        "run.tensorboard=false", "run.checkpoint_every=100", "train.precision=fp32"])
    run_dir = run(config)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 20 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert "loss_point_image" in rows[-1]
    loaded = imagefm.load(run_dir / "final")
    assert isinstance(loaded, PointTextModel)
    results = evaluate_points(loaded, shapes, real_root=None)
    for lang in ("en", "ko"):
        assert 0 <= results["zero_shot"][lang]["top1"] <= 1
        assert results["retrieval"][lang]["n_images"] == results["n_shapes"]
    assert set(results["rotation"]) == {"none", "z", "so3"}
    assert results["rotation"]["none"]["en"] == results["zero_shot"]["en"]["top1"]
    assert plot_robustness(results, tmp_path / "plot.png").stat().st_size > 1000


def test_description_retrieval_counts_identical_shapes():
    red = {"spec": {"objects": [{"colour": "red", "shape": "cube"}], "relation": None}}
    blue = {"spec": {"objects": [{"colour": "blue", "shape": "cube"}], "relation": None}}
    records, owner = [red, red, blue], [0, 1, 2]  # one caption per shape
    # Shape 1's caption is nearest to shape 0 (the same description); shape 2's to shape 0.
    similarity = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.0, 0.0, 0.1]])
    result = description_retrieval(similarity, records, owner, ks=(1, 2))
    assert result["text_to_image"] == {"R@1": pytest.approx(2 / 3), "R@2": pytest.approx(2 / 3)}
    assert result["image_to_text"]["R@1"] == pytest.approx(2 / 3)  # shape 1's best is caption 2
    assert result["distinct_descriptions"] == 2
    plain = retrieval_metrics(similarity, owner, ks=(1,))
    assert plain["text_to_image"]["R@1"] == pytest.approx(1 / 3)
