"""Evaluators for evaluation during training: the numbers are those of eval/retrieval.py and
eval/zeroshot.py on the same held-out records, per language, within eval.limit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.config import ConfigError
from imagefm.data.formats import ShardWriter, read_shards
from imagefm.data.records import Caption, Record
from imagefm.data.synthetic import generate
from imagefm.data.synthetic.vocab import COLOUR_NAMES, class_names
from imagefm.eval.retrieval import evaluate_retrieval_languages
from imagefm.eval.training import HeldOutEvaluator, class_names_in, training_evaluators
from imagefm.eval.zeroshot import evaluate_records
from imagefm.models.dual_encoder import DualEncoder, fit_text_to_tokenizer
from imagefm.processor import Processor
from imagefm.tokenizer import train_bpe
from imagefm.train.config import load_config

BATCH = 4


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Single-object synthetic scenes labelled by colour, two captions each in en and ko."""
    return list(generate("scenes", 12, seed=5, image_size=32, label_by="colour", workers=1))


@pytest.fixture(scope="module")
def model(records) -> DualEncoder:
    torch.manual_seed(0)
    corpus = [c.text for r in records for c in r.captions] * 3
    tokenizer = train_bpe(corpus, 400, context_length=32)
    config = fit_text_to_tokenizer(imagefm.preset("tiny"), tokenizer)
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                    image_size=32))
    model = DualEncoder(config).eval()
    with torch.no_grad():  # a fresh model embeds everything alike (ties); make them differ
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.tokenizer = tokenizer
    return model


@pytest.fixture(scope="module")
def shards(records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout")
    with ShardWriter(out, max_samples=5) as writer:  # three shards
        for record in records:
            writer.write(record)
    return out


def config_for(data: Path | None, *overrides: str):
    base = ["model.preset=tiny", "eval.every=5", f"eval.batch_size={BATCH}"]
    if data is not None:
        base.append(f"eval.data={data}")
    return load_config(None, base + list(overrides))


def renumbered(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Labels renumbered over the classes present (what the evaluator's candidates are)."""
    present = sorted({r.label for r in records})
    copies = [dataclasses.replace(r, label=present.index(r.label)) for r in records]
    return copies, [COLOUR_NAMES[label] for label in present]


def direct_metrics(model, records: list[Record], langs: list[str]) -> dict[str, float]:
    """What eval/retrieval.py and eval/zeroshot.py compute on the same records."""
    processor = Processor.for_model(model)
    expected = {}
    for result in evaluate_retrieval_languages(model, processor, records, langs,
                                               batch_size=BATCH):
        expected[f"eval/{result['lang']}/i2t_r1"] = result["image_to_text"]["R@1"]
        expected[f"eval/{result['lang']}/t2i_r1"] = result["text_to_image"]["R@1"]
    labelled, english = renumbered(records)
    korean = [class_names("colour", "ko")[name] for name in english]
    for lang in langs:
        names = {"en": english, "ko": korean}[lang]
        result = evaluate_records(model, processor, labelled, names, lang, batch_size=BATCH)
        expected[f"eval/{lang}/zeroshot_top1"] = result["top1"]
    return expected


def test_metrics_equal_the_evaluation_functions_on_the_same_records(model, shards, records):
    (evaluate,) = training_evaluators(config_for(shards), model)
    metrics = evaluate(model)
    expected = direct_metrics(model, records, ["en", "ko"])
    assert set(metrics) == set(expected) | {"eval/retrieval_r1", "eval/zeroshot_top1"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    retrieval = [expected[f"eval/{lang}/{d}_r1"] for lang in ("en", "ko") for d in ("i2t", "t2i")]
    assert metrics["eval/retrieval_r1"] == pytest.approx(sum(retrieval) / 4)
    zeroshot = [expected["eval/en/zeroshot_top1"], expected["eval/ko/zeroshot_top1"]]
    assert metrics["eval/zeroshot_top1"] == pytest.approx(sum(zeroshot) / 2)
    assert len(set(metrics.values())) >= 3  # not a comparison of zeros or of ties
    assert all(0 <= value <= 1 for value in metrics.values())


def test_languages_and_limit(model, shards, records):
    (evaluate,) = training_evaluators(config_for(shards, "eval.langs=[ko]", "eval.limit=7"),
                                      model)
    assert len(evaluate.images) == 7 and evaluate.retrieval_langs == ["ko"]
    metrics = evaluate(model)
    assert set(metrics) == {"eval/ko/i2t_r1", "eval/ko/t2i_r1", "eval/retrieval_r1",
                            "eval/ko/zeroshot_top1", "eval/zeroshot_top1"}
    expected = direct_metrics(model, records[:7], ["ko"])
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def test_evaluation_leaves_the_model_as_it_was(model, shards):
    (evaluate,) = training_evaluators(config_for(shards, "eval.limit=4"), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        first = evaluate(model)
        assert model.training  # the train/eval state is restored
        assert all(p.grad is None for p in model.parameters())
        assert evaluate(model) == first  # deterministic
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_records_are_skipped_and_counted(model, records, tmp_path):
    broken = [dataclasses.replace(records[0], key="broken", image=b"not an image"),
              dataclasses.replace(records[1], key="noimage", image=None)]
    with ShardWriter(tmp_path, max_samples=10) as writer:
        for record in broken + records[2:6]:
            writer.write(record)
    (evaluate,) = training_evaluators(config_for(tmp_path), model)
    assert len(evaluate.images) == 4
    assert evaluate.skipped["skipped"] == {"undecodable image": 1, "no image": 1}
    assert set(evaluate(model)) >= {"eval/en/i2t_r1", "eval/retrieval_r1"}


def test_a_recipe_folder_gives_its_test_shards_only(model, records, tmp_path):
    with ShardWriter(tmp_path, prefix="train", max_samples=10) as writer:
        for record in records[:6]:
            writer.write(record)
    with ShardWriter(tmp_path, prefix="test", max_samples=10) as writer:
        for record in records[6:]:
            writer.write(record)
    (evaluate,) = training_evaluators(config_for(tmp_path), model)
    assert evaluate.images == [r.image for r in read_shards(tmp_path / "test-000000.tar")]


def test_captions_without_labels_give_retrieval_only(model, tmp_path):
    unlabelled = [Record(key=r.key, image=r.image, captions=r.captions) for r in
                  generate("scenes", 4, seed=1, image_size=32, workers=1)]
    evaluator = HeldOutEvaluator(unlabelled, model, batch_size=BATCH)
    assert set(evaluator(model)) == {"eval/en/i2t_r1", "eval/en/t2i_r1", "eval/ko/i2t_r1",
                                     "eval/ko/t2i_r1", "eval/retrieval_r1"}


def test_labels_without_captions_give_zeroshot_only(model, records):
    bare = [dataclasses.replace(r, captions=[]) for r in records[:6]]
    metrics = HeldOutEvaluator(bare, model, batch_size=BATCH)(model)
    assert set(metrics) == {"eval/en/zeroshot_top1", "eval/zeroshot_top1"}
    labelled, english = renumbered(bare)
    expected = evaluate_records(model, Processor.for_model(model), labelled, english, "en",
                                batch_size=BATCH)
    assert metrics["eval/en/zeroshot_top1"] == pytest.approx(expected["top1"], abs=1e-9)


def test_no_evaluators_for_a_vlm_or_without_held_out_data(model, shards):
    assert training_evaluators(config_for(None), model) == []
    assert training_evaluators(config_for(shards, "task.name=vlm", "model.init=somewhere"),
                               model) == []


def test_missing_data_and_missing_tokenizer_are_config_errors(model, shards, tmp_path):
    with pytest.raises(ConfigError, match="eval.data = .*nowhere"):
        training_evaluators(config_for(tmp_path / "nowhere"), model)
    bare = DualEncoder(model.config)
    with pytest.raises(ConfigError, match="tokenizer"):
        training_evaluators(config_for(shards), bare)


def test_class_names_in_other_languages():
    assert class_names_in("en", ["red", "cat"]) == ["red", "cat"]
    assert class_names_in("ko", ["red", "cat", "star"]) == ["빨간색", "고양이", "별"]
    assert class_names_in("ko", ["red", "zebra"]) is None
    assert class_names_in("fr", ["red"]) is None


def test_korean_captions_are_present(records):
    # The fixture must exercise both languages for the per-language checks above to mean much.
    assert {c.lang for r in records for c in r.captions} == {"en", "ko"}
    assert all(isinstance(c, Caption) for r in records for c in r.captions)
    assert len({r.label for r in records}) >= 3
