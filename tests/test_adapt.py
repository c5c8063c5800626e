"""Adaptation methods on tiny random dual encoders: LoRA merge, WiSE-FT endpoints, probes,
Tip-Adapter, CoOp, fine-tuning, AUROC, splits and anomaly maps."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import imagefm
from imagefm.adapt.anomaly import AnomalyDetector
from imagefm.adapt.coop import CoopConfig, PromptLearner, train_coop
from imagefm.adapt.data import LabelledImages, load_labelled, make_splits
from imagefm.adapt.features import FeatureViews, extract_features, feature_views
from imagefm.adapt.finetune import FinetuneConfig, finetune, layer_decay_multipliers
from imagefm.adapt.head import Head, accuracy, text_head
from imagefm.adapt.lora import LoraSettings, add_lora, lora_parameters, merge_lora
from imagefm.adapt.metrics import auroc
from imagefm.adapt.probe import ProbeConfig, train_probe
from imagefm.adapt.tip_adapter import tip_adapter, tip_adapter_f
from imagefm.adapt.tune import Batchable, class_prompts
from imagefm.adapt.wise_ft import choose_alpha, interpolate_state, wise_ft
from imagefm.apps.zeroshot import ZeroShotClassifier, logit_parts
from imagefm.config import TextConfig, VisionConfig
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
from imagefm.processor import Processor
from imagefm.tokenizer import train_bpe

CLASSES = ["red", "green", "blue"]
CORPUS = ["a photo of a red square", "a photo of a green square", "a photo of a blue square",
          "a photo of the small circle", "itap of a star", "a bad photo of a thing"] * 4


def micro_model(seed: int = 0) -> tuple[DualEncoder, Processor]:
    """A random CLIP small enough for sub-second training steps, with a real BPE tokenizer."""
    torch.manual_seed(seed)
    tokenizer = train_bpe(CORPUS, 300, context_length=24)
    config = dataclasses.replace(
        imagefm.preset("tiny"), embed_dim=32,
        vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2,
                            mlp_dim=64, act="gelu"),
        text=TextConfig(vocab_size=300, context_length=24, width=32, layers=2, heads=2,
                        mlp_dim=64, act="gelu"))
    model = DualEncoder(fit_text_to_tokenizer(config, tokenizer)).eval()
    model.tokenizer = tokenizer
    return model, Processor.for_model(model)


def coloured(colour: str, seed: int, size: int = 32) -> bytes:
    """A PNG of one colour with a little noise."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}[colour]
    noise = np.random.default_rng(seed).integers(-20, 20, (size, size, 3))
    pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def toy_views(n_per_class: int, dim: int = 16, seed: int = 0) -> FeatureViews:
    """Three well separated Gaussian clusters (the same for every ``seed``), normalised."""
    centres = F.normalize(torch.randn(3, dim, generator=torch.Generator().manual_seed(99)),
                          dim=-1) * 4
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + 0.3 * torch.randn(n_per_class, dim, generator=g) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = F.normalize(x, dim=-1)
    return FeatureViews(x, x.clone(), y)


# ------------------------------------------------------------------ LoRA
def test_lora_merge_gives_the_unmerged_outputs_and_a_plain_checkpoint(tmp_path):
    model, processor = micro_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = torch.randn(3, 3, 32, 32)
    ids = processor(texts=["a photo of a red square", "itap of a star"])
    before = model.encode_image(pixels)
    adapted = add_lora(model, LoraSettings(rank=2, towers="both"))
    # A trained adapter: B is zero at initialisation, so give it values.
    for name, p in lora_parameters(adapted).items():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    assert all("lora_" in n for n, p in adapted.named_parameters() if p.requires_grad)
    with torch.no_grad():
        image = adapted.encode_image(pixels)
        text = adapted.encode_text(ids["input_ids"], ids["attention_mask"])
    # The update is really applied, including q/k/v (fused only for plain Linear layers).
    assert (image - before).abs().max() > 1e-3
    merged = merge_lora(adapted)
    assert not any("lora" in name for name in merged.state_dict())
    assert set(merged.state_dict()) == set(base_state)
    assert type(merged.vision.transformer.blocks[0].attn.q_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels), image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged.encode_text(ids["input_ids"], ids["attention_mask"]),
                                   text, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    reloaded = imagefm.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(pixels), image, atol=1e-5, rtol=1e-5)


def test_lora_targets_one_tower_only():
    model, _ = micro_model()
    adapted = add_lora(model, LoraSettings(rank=2, towers="text"))
    names = list(lora_parameters(adapted))
    assert names and all(n.startswith("text.") for n in names)
    # 2 blocks x (q, k, v, o, fc1, fc2), each with an A and a B.
    assert len(names) == 2 * 6 * 2


# ------------------------------------------------------------------ WiSE-FT
def test_wise_ft_endpoints_are_exact_and_the_middle_is_the_mean():
    zero_shot, processor = micro_model(seed=0)
    tuned, _ = micro_model(seed=1)
    pixels = torch.randn(2, 3, 32, 32)
    for alpha, endpoint in ((0.0, zero_shot), (1.0, tuned)):
        mixed = wise_ft(zero_shot, tuned, alpha)
        for name, tensor in mixed.state_dict().items():
            assert torch.equal(tensor, endpoint.state_dict()[name]), (alpha, name)
        with torch.no_grad():
            assert torch.equal(mixed.encode_image(pixels), endpoint.encode_image(pixels))
    middle = interpolate_state(zero_shot.state_dict(), tuned.state_dict(), 0.5)
    w0 = zero_shot.state_dict()["image_proj.weight"]
    w1 = tuned.state_dict()["image_proj.weight"]
    torch.testing.assert_close(middle["image_proj.weight"], (w0 + w1) / 2)
    with pytest.raises(ValueError, match="alpha"):
        interpolate_state(zero_shot.state_dict(), tuned.state_dict(), 1.5)


def test_choose_alpha_respects_the_reference_drop():
    zero_shot, _ = micro_model(seed=0)
    tuned, _ = micro_model(seed=1)

    # Scores that depend only on alpha (read back from a weight): the target rises with alpha,
    # the reference falls; 0.025 of reference may be lost, i.e. alpha <= 0.25 here.
    def alpha_of(model: nn.Module) -> float:
        w0, w1 = zero_shot.image_proj.weight, tuned.image_proj.weight
        return float(((model.image_proj.weight - w0) / (w1 - w0)).median().detach())

    alpha, curve = choose_alpha(zero_shot, tuned, target=lambda m: alpha_of(m),
                                reference=lambda m: 1 - 0.1 * alpha_of(m), max_drop=0.025)
    assert alpha == pytest.approx(0.2, abs=1e-6)
    assert [c["alpha"] for c in curve][0] == 0.0 and len(curve) == 11


# ------------------------------------------------------------------ linear probe
def test_linear_probe_separates_a_separable_toy_set():
    train, val, test = toy_views(8, seed=0), toy_views(4, seed=1), toy_views(50, seed=2)
    head, info = train_probe(train, val, 3, ProbeConfig(features="post"))
    assert accuracy(head.logits(test.post), test.labels) == 1.0
    assert info["features"] == "post" and info["val_accuracy"] == 1.0


def test_zero_shot_initialised_probe_keeps_zero_shot_under_strong_regularisation():
    train = toy_views(2, seed=0)
    zs = Head(torch.randn(3, 16) * 5, torch.zeros(3))
    head, info = train_probe(train, train, 3, ProbeConfig(l2_grid=(1e4,), l2_grid_init=()),
                             init=zs)
    assert info["l2"] == 1e4
    torch.testing.assert_close(head.weight, zs.weight, atol=1e-3, rtol=0)


# ------------------------------------------------------------------ Tip-Adapter
def test_tip_adapter_with_zero_shots_is_the_zero_shot_classifier():
    model, processor = micro_model()
    images = [coloured(c, s) for c in CLASSES for s in range(2)]
    classifier = ZeroShotClassifier(model, processor, CLASSES)
    expected = classifier.logits(images)
    feats = extract_features(model, processor, images)
    views = feature_views(model, feats.pre, torch.arange(3).repeat_interleave(2))
    zs = text_head(classifier.class_embeddings, *logit_parts(model))
    empty = views.subset([])
    for method in (tip_adapter, tip_adapter_f):
        head, _ = method(zs, empty, views)
        torch.testing.assert_close(head.logits(views.post), expected, atol=1e-5, rtol=1e-5)


def test_tip_adapter_cache_fixes_what_zero_shot_gets_wrong():
    train, test = toy_views(4, seed=0), toy_views(20, seed=1)
    means = torch.stack([train.post[train.labels == c].mean(dim=0) for c in range(3)])
    wrong = Head(-5 * means, torch.zeros(3))  # a "zero-shot" head that is always wrong
    assert accuracy(wrong.logits(test.post), test.labels) == 0.0
    head, info = tip_adapter(wrong, train, test)
    assert accuracy(head.logits(test.post), test.labels) == 1.0 and info["alpha"] > 0
    tuned, _ = tip_adapter_f(wrong, train, test)
    assert not torch.equal(tuned.cache_keys, head.cache_keys)  # the keys trained


# ------------------------------------------------------------------ CoOp
def test_coop_context_trains_and_the_towers_stay_unchanged():
    model, processor = micro_model()
    images = [coloured(c, s) for c in CLASSES for s in range(3)]
    feats = extract_features(model, processor, images)
    views = feature_views(model, feats.pre, torch.arange(3).repeat_interleave(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    head, info = train_coop(model, processor.tokenizer, CLASSES, views, views,
                            CoopConfig(steps=20, lr=0.05, eval_every=5))
    assert not torch.allclose(info["final_context"], info["initial_context"])
    assert info["trainable_parameters"] == info["initial_context"].numel()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert head.weight.shape == (3, 32)


def test_coop_starts_as_the_template_it_replaces():
    """With the context at its initial value the prompt is "a photo of a <class>." exactly."""
    model, processor = micro_model()
    learner = PromptLearner(model, processor.tokenizer, CLASSES, "a photo of a {}.")
    with torch.no_grad():
        learned = learner.class_embeddings(model)
        batch = processor(texts=[f"a photo of a {c}." for c in CLASSES])
        plain = F.normalize(model.encode_text(batch["input_ids"], batch["attention_mask"]),
                            dim=-1)
    torch.testing.assert_close(learned, plain, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ fine-tuning
def test_layer_decay_multipliers_follow_depth():
    model, _ = micro_model()
    mults = layer_decay_multipliers(model, 0.5, ("vision",))
    assert mults["vision.transformer.blocks.1.attn.q_proj.weight"] == 0.5
    assert mults["vision.transformer.blocks.0.attn.q_proj.weight"] == 0.25
    assert mults["vision.patch_embed.weight"] == 0.125
    assert mults["vision.norm_post.weight"] == 1.0 and mults["image_proj.weight"] == 1.0
    assert not any(name.startswith("text") for name in mults)


def test_finetune_with_locked_text_tower_changes_only_the_image_side():
    model, processor = micro_model()
    images = [coloured(c, s) for c in CLASSES for s in range(2)]
    pixels = processor(images=images)["pixel_values"]
    labels = torch.arange(3).repeat_interleave(2)
    data = Batchable(labels, pixels=pixels)
    tuned, info = finetune(model, processor, class_prompts(CLASSES), data, data,
                           FinetuneConfig(steps=6, lr=1e-2, eval_every=2, batch_size=6))
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v,
                                                                           model.state_dict()[k])}
    assert changed and all(k.startswith(("vision.", "image_proj.")) for k in changed)
    assert info["trainable_parameters"] == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("vision.", "image_proj.")))


# ------------------------------------------------------------------ AUROC
def test_auroc_hand_computed():
    # Positives 0.35 and 0.8, negatives 0.1 and 0.4: of the 4 (pos, neg) pairs, 3 are ordered.
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    assert auroc([0.5, 0.5], [0, 1]) == 0.5  # a tie counts one half
    assert auroc([3.0, 1.0, 2.0], [1, 0, 0]) == 1.0
    assert auroc([3.0, 1.0, 2.0], [0, 1, 1]) == 0.0
    # Ties across classes: pairs (pos 0.5 vs neg 0.5) = 1/2, (pos 0.5 vs neg 0.2) = 1.
    assert auroc([0.2, 0.5, 0.5], [0, 0, 1]) == 0.75
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])


# ------------------------------------------------------------------ data splits
def _labelled(n_per_class: int) -> LabelledImages:
    labels = torch.arange(3).repeat_interleave(n_per_class)
    return LabelledImages([b"x"] * len(labels), labels, CLASSES,
                          [f"k{i}" for i in range(len(labels))], ["train"] * len(labels))


def test_splits_are_disjoint_nested_and_deterministic():
    splits = make_splits(_labelled(20), val_per_class=3, test_fraction=0.25, seed=5)
    keys = [set(getattr(splits, p).keys) for p in ("pool", "val", "test")]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(splits.val) == 9 and len(splits.test) == 15 and splits.max_shots() == 12
    one, four = splits.shots(1), splits.shots(4)
    assert set(one.keys) <= set(four.keys)
    assert torch.bincount(four.labels).tolist() == [4, 4, 4]
    again = make_splits(_labelled(20), val_per_class=3, test_fraction=0.25, seed=5)
    assert again.shots(4).keys == four.keys
    with pytest.raises(ValueError, match="shots"):
        splits.shots(13)


def test_cifar10_shards_load_with_their_splits(shared_data):
    data = load_labelled(shared_data / "cifar10")
    assert data.classnames[:2] == ["airplane", "automobile"] and len(data.classnames) == 10
    assert data.splits.count("test") == 5000 and data.splits.count("train") == 10000
    splits = make_splits(data, val_per_class=10, test_per_class=20)
    assert len(splits.test) == 200 and splits.max_shots() == 990


# ------------------------------------------------------------------ anomaly detection
def test_anomaly_detector_maps_and_memory():
    model, processor = micro_model()
    normal = processor(images=[coloured("green", s) for s in range(2)])["pixel_values"]
    odd = processor(images=[coloured("red", 9)])["pixel_values"]
    detector = AnomalyDetector(model, processor, "surface")
    image, maps = detector.zero_shot(torch.cat([normal, odd]))
    assert image.shape == (3,) and maps.shape == (3, 32, 32)
    assert ((image >= 0) & (image <= 1)).all()
    detector.fit(normal)
    scores, maps = detector.few_shot(torch.cat([normal, odd]))
    # The remembered images match themselves patch for patch.
    assert scores[:2].abs().max() < 1e-5 and scores[2] > 1e-3
    assert maps.shape == (3, 32, 32)


def test_anomaly_detector_refuses_a_tower_without_patch_tokens():
    model, processor = micro_model()
    model = copy.deepcopy(model)
    model.vision = nn.Identity()
    with pytest.raises(ValueError, match="patch tokens"):
        AnomalyDetector(model, processor, "surface")


# ------------------------------------------------------------------ settings
def test_overrides_are_typed_and_validated():
    from imagefm.adapt import parse_overrides
    from imagefm.config import ConfigError

    configs = parse_overrides(["finetune.lr=1e-4", "wise.alphas=[0, 0.5, 1]", "lora.steps=10",
                               "probe.features=pre"])
    assert configs.finetune.lr == 1e-4 and configs.wise.alphas == (0.0, 0.5, 1.0)
    assert configs.lora.steps == 10 and configs.probe.features == "pre"
    for bad, message in (("lora.steps=1.5", "whole number"), ("lora.bogus=1", "bogus"),
                         ("nothing.x=1", "unknown section"), ("lora.towers=left", "towers"),
                         ("probe.features=mid", "features")):
        with pytest.raises((ConfigError, ValueError), match=message):
            parse_overrides([bad])


def test_feature_cache_is_keyed_by_the_image_tower_only(tmp_path):
    from imagefm.adapt.features import cached_features

    model, processor = micro_model()
    images = [coloured(c, i) for i, c in enumerate(CLASSES)]
    keys = ["r", "g", "b"]
    first = cached_features(model, processor, images, keys, tmp_path)
    with torch.no_grad():  # new heads over the same locked tower: the same features, one file
        model.text_proj.weight.mul_(2)
        model.image_proj.weight.mul_(2)
    again = cached_features(model, processor, images, keys, tmp_path)
    assert len(list(tmp_path.iterdir())) == 1 and torch.equal(again.pre, first.pre)
    with torch.no_grad():  # a changed tower never reads the old file
        next(model.vision.parameters()).add_(0.5)
    changed = cached_features(model, processor, images, keys, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
    assert torch.allclose(changed.pre, extract_features(model, processor, images).pre)
    assert not torch.allclose(changed.pre, first.pre)
