"""Zero-shot classification with a hand-built fake dual encoder whose embeddings we control."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagefm.apps.zeroshot import ZeroShotClassifier, class_embeddings, ensemble_prompts
from imagefm.eval.templates import load_templates
from imagefm.eval.zeroshot import evaluate_zeroshot

DIM = 8


class FakeProcessor:
    """Images are keys of a table of vectors; texts become vectors through ``text_fn``.

    The "pixel values" and "input ids" it returns are the embeddings themselves, and the fake
    model's encoders are the identity, so every embedding is exactly what the test chose.
    """

    def __init__(self, images: dict[str, torch.Tensor],
                 text_fn: Callable[[str], torch.Tensor]) -> None:
        self.images = images
        self.text_fn = text_fn
        self.texts_seen: list[str] = []

    def __call__(self, images=None, texts=None) -> dict[str, torch.Tensor]:
        out = {}
        if images is not None:
            missing = [key for key in images if key not in self.images]
            if missing:
                raise ValueError(f"cannot decode image {missing[0]}")
            out["pixel_values"] = torch.stack([self.images[key] for key in images])
        if texts is not None:
            self.texts_seen.extend(texts)
            out["input_ids"] = torch.stack([self.text_fn(t) for t in texts])
            out["attention_mask"] = torch.ones(len(texts), 1, dtype=torch.long)
        return out


class FakeModel(nn.Module):
    def __init__(self, scale: float = 10.0, bias: float | None = None,
                 model_type: str = "clip") -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.logit_bias = nn.Parameter(torch.tensor(bias)) if bias is not None else None
        self.config = type("Config", (), {"model_type": model_type})()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def encode_text(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return input_ids.float()


def unit(i: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), DIM).float()


CLASSES = {"cat": "고양이", "deer": "사슴", "horse": "말", "bear": "곰", "car": "자동차",
           "dog": "개"}


def class_text_fn(names: list[str]) -> Callable[[str], torch.Tensor]:
    """A prompt's vector: its class direction, plus a template-dependent tilt, at any length."""

    def fn(text: str) -> torch.Tensor:
        matches = [i for i, name in enumerate(names) if name in text]
        assert len(matches) == 1, f"prompt names no single class: {text!r}"
        tilt = 0.2 * unit(6) if "photo" in text or "사진" in text else 0.2 * unit(7)
        return (3.0 + len(text) % 3) * (unit(matches[0]) + tilt)

    return fn


def test_prompt_ensemble_is_mean_of_normalised_embeddings_renormalised() -> None:
    vectors = torch.tensor([[3.0, 0, 0, 0], [0, 0.5, 0, 0], [1, 1, 0, 0]])
    normalised = vectors / vectors.norm(dim=1, keepdim=True)
    expected = normalised.mean(0) / normalised.mean(0).norm()
    torch.testing.assert_close(ensemble_prompts(vectors), expected)
    # The raw mean points elsewhere: normalising each prompt first matters.
    raw = vectors.mean(0) / vectors.mean(0).norm()
    assert not torch.allclose(raw, expected, atol=1e-3)

    table = {"p1": vectors[0], "p2": vectors[1], "p3": vectors[2],
             "q": torch.tensor([0, 0, 2.0, 0])}
    processor = FakeProcessor({}, lambda t: table[t])
    embeds = class_embeddings(FakeModel(), processor, [["p1", "p2", "p3"], ["q", "p1"]])
    torch.testing.assert_close(embeds[0], expected)
    both = F.normalize(table["q"], dim=0) + normalised[0]
    torch.testing.assert_close(embeds[1], both / both.norm())
    assert processor.texts_seen.count("p1") == 1  # a prompt shared by classes is encoded once


def _images(labels_and_vectors: list[tuple[int, torch.Tensor]]) -> tuple[dict, list]:
    table, samples = {}, []
    for index, (label, vector) in enumerate(labels_and_vectors):
        table[f"img{index}"] = vector
        samples.append((f"img{index}", label, f"img{index}.png"))
    return table, samples


@pytest.mark.parametrize("lang", ["en", "ko"])
def test_zeroshot_accuracy_with_controlled_embeddings(lang: str) -> None:
    names = list(CLASSES) if lang == "en" else list(CLASSES.values())
    e = unit
    table, samples = _images([
        (0, e(0)),                 # right
        (1, e(1) + 0.1 * e(0)),    # right
        (2, e(2)),                 # right
        (3, e(1) + 0.5 * e(3)),    # wrong: bear scored second -> top-5 hit, predicted deer
        (4, e(0) - 0.5 * e(4)),    # wrong: car scored last -> miss at top-5, predicted cat
        (5, e(5)),                 # right
        (5, e(5) + 0.2 * e(2)),    # right
    ])
    samples.append(("broken", 0, "broken.png"))  # not in the table: the processor raises
    processor = FakeProcessor(table, class_text_fn(names))
    result = evaluate_zeroshot(FakeModel(), processor, samples, CLASSES, lang=lang,
                               name="fake", batch_size=3)
    assert result["n"] == 7
    assert result["top1"] == pytest.approx(5 / 7)
    assert result["top5"] == pytest.approx(6 / 7)
    assert result["per_class"] == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert result["confusion"][3][1] == 1 and result["confusion"][4][0] == 1
    assert result["classes"] == names
    assert result["skipped"]["skipped"] == {"undecodable image": 1}
    assert "broken.png" in result["skipped"]["examples"]["undecodable image"][0]
    if lang == "ko":  # the prompts are rendered Korean templates with the right particles
        assert "사슴을 찍은 사진" in processor.texts_seen
        assert "이것은 자동차다." in processor.texts_seen
    assert result["num_templates"] == len(load_templates(lang))
    assert len(set(processor.texts_seen)) == len(names) * len(load_templates(lang))


def test_classifier_predicts_with_clip_softmax_and_siglip_sigmoid() -> None:
    names = ["cat", "dog", "owl"]
    table = {"a": unit(1), "b": unit(2) + unit(0)}
    text_fn = class_text_fn(names)
    clf = ZeroShotClassifier(FakeModel(scale=10.0), FakeProcessor(table, text_fn), names,
                             templates=["a photo of a {}."])
    probs = clf.probabilities(["a", "b"])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    cos = torch.tensor([[0.0, 1.0, 0.0]]) / math.sqrt(1 + 0.04)  # image a against tilted classes
    torch.testing.assert_close(clf.logits("a"), 10.0 * cos)
    top = clf.predict(["a", "b"], top_k=2)
    assert [p.name for p in top] == ["dog", "cat"] or [p.name for p in top] == ["dog", "owl"]
    assert top[0].label == 1 and top[0].probability == pytest.approx(float(probs[0, 1]))
    assert len(top[0].top_k) == 2 and top[0].top_k[0][0] == "dog"
    assert clf.prompts == [["a photo of a cat."], ["a photo of a dog."], ["a photo of an owl."]]

    siglip = ZeroShotClassifier(FakeModel(scale=10.0, bias=-5.0, model_type="siglip"),
                                FakeProcessor(table, text_fn), names,
                                templates=["a photo of a {}."])
    logits = siglip.logits(["a"])
    torch.testing.assert_close(logits, 10.0 * cos - 5.0)
    torch.testing.assert_close(siglip.probabilities(["a"]), torch.sigmoid(logits))


def test_classifier_from_explicit_prompts_and_errors() -> None:
    table = {"x": unit(0)}
    processor = FakeProcessor(table, class_text_fn(["red", "blue"]))
    clf = ZeroShotClassifier(FakeModel(), processor, ["빨강", "파랑"], lang="ko",
                             prompts=[["red thing", "red"], ["blue thing"]])
    assert clf.predict("x")[0].name == "빨강"
    with pytest.raises(ValueError, match="2 classes"):
        ZeroShotClassifier(FakeModel(), processor, ["a", "b"], prompts=[["red"]])
    with pytest.raises(ValueError, match="cannot decode image nope"):
        clf.predict(["nope"])


def test_model_train_state_is_restored() -> None:
    model = FakeModel().train()
    clf = ZeroShotClassifier(model, FakeProcessor({"x": unit(0)}, class_text_fn(["cat"])),
                             ["cat"], templates=["{}"])
    clf.predict("x")
    assert model.training
