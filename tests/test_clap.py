"""CLAP speech–text dual encoder: model, data source, training, saving, evaluation.

Built on a tiny dataset of tones (no espeak-ng needed): class k is a tone at its own pitch,
captioned "tone k" / "소리 k", so the speech side has something a few steps can learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("soundfile")
pytest.importorskip("soxr")

import imagefm  # noqa: E402
from imagefm.convert.clap import build_clap  # noqa: E402
from imagefm.data.formats import SkipCounter  # noqa: E402
from imagefm.data.records import Caption  # noqa: E402
from imagefm.data.speech_sets import SpeechItem, write_speech_dataset  # noqa: E402
from imagefm.losses import clip_loss  # noqa: E402
from imagefm.models.audio_features import log_mel  # noqa: E402
from imagefm.models.clap import FEATURE_PAD, frame_mask_of, pad_features  # noqa: E402
from imagefm.train.config import load_config  # noqa: E402
from imagefm.train.distributed import DistInfo  # noqa: E402
from imagefm.train.metrics import read_metrics  # noqa: E402

CLASSES = 6
RATE = 16000


def _tone(k: int, rng: np.random.Generator) -> np.ndarray:
    seconds = float(rng.uniform(0.3, 0.8))
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.5 * np.sin(2 * np.pi * (300 + 250 * k) * t) + 0.02 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    rng = np.random.default_rng(0)
    classes = {"en": [f"tone {k}" for k in range(CLASSES)],
               "ko": [f"소리 {k}" for k in range(CLASSES)]}

    def examples():
        for split, repeats in (("train", 8), ("test", 3)):
            for r in range(repeats):
                for k in range(CLASSES):
                    captions = [Caption(classes["en"][k], "en"), Caption(classes["ko"][k], "ko")]
                    label = k if r % 2 == 0 else None  # half keywords, half "sentences"
                    yield SpeechItem(f"{split}-{k}-{r}", classes["en"][k], "en", captions, split,
                                     "tones", label=label), _tone(k, rng)

    out = tmp_path_factory.mktemp("tones")
    write_speech_dataset(examples(), out, name="tones", skips=SkipCounter(), classes=classes)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_clap("clap-tiny", pretrained=False)


def _waves(seed=1):
    rng = np.random.default_rng(seed)
    return [_tone(0, rng), _tone(3, rng)[:4000], _tone(5, rng)]


def test_forward_shapes_and_padding(model):
    features = model.features(_waves())
    assert features.shape[:2] == (3, 80)
    mask = frame_mask_of(features)
    assert mask[1].sum() == 25 and mask[1, 25:].eq(False).all()  # 4000 samples / hop 160
    assert (features[1, :, 25:] == FEATURE_PAD).all()
    batch = model.tokenizer(["tone 0", "소리 3", "a longer caption here"])
    out = model(features, batch["input_ids"], batch["attention_mask"])
    assert out.image_embeds.shape == out.text_embeds.shape == (3, 64)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.logits_per_image.shape == (3, 3)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.t())


def test_padding_beyond_the_clip_does_not_change_its_embedding(model):
    """Two batches pad the short clip to different lengths: its embedding is the same."""
    waves = _waves()
    short = model.encode_audio(model.features([waves[1], waves[0]]))[0]
    longer = model.encode_audio(model.features([waves[1], waves[2]]))[0]
    assert model.features([waves[1], waves[0]]).shape[-1] != model.features(
        [waves[1], waves[2]]).shape[-1]
    torch.testing.assert_close(short, longer, atol=1e-5, rtol=1e-5)


def test_pad_features_round_trip(model):
    features, mask = log_mel(_waves(), model.config.mel)
    assert features.min() >= -1.5  # the log-mel floor, well above FEATURE_PAD
    assert torch.equal(frame_mask_of(pad_features(features, mask)), mask)


def test_precomputed_text_features_skip_the_tower(model):
    batch = model.tokenizer(["tone 1", "소리 2"])
    pooled = model.text(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(model.encode_text(pooled),
                               model.encode_text(batch["input_ids"], batch["attention_mask"]))
    with pytest.raises(ValueError, match="precomputed text features"):
        model.encode_text(torch.zeros(2, 7))


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "clap")
    loaded = imagefm.load(tmp_path / "clap")
    assert type(loaded).__name__ == "ClapModel" and loaded.config == model.config
    features = model.features(_waves())
    batch = model.tokenizer(["tone 0", "소리 3", "tone 5"])
    assert loaded.tokenizer(["소리 3"])["input_ids"].tolist() == \
        model.tokenizer(["소리 3"])["input_ids"].tolist()
    model.eval()
    with torch.no_grad():
        a = model(features, batch["input_ids"], batch["attention_mask"])
        b = loaded(features, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image)


def _config(data, tmp_path, *overrides):
    return load_config(None, ["model.preset=clap-tiny", "model.pretrained=false",
                              "data.source=speech", f"data.path={data}", "data.batch_size=12",
                              "run.device=cpu", "run.progress=false", "run.tensorboard=false",
                              f"run.output_dir={tmp_path}", "train.precision=fp32", *overrides])


def test_data_source_batches(tones, model, tmp_path):
    from imagefm.train.data import get_data_source

    source = get_data_source("speech")
    config = _config(tones, tmp_path, "data.options.caption_langs=[ko]")
    loader = source(config, model, DistInfo())
    first, again = list(loader(0)), list(loader(0))
    assert len(first) == (CLASSES * 8) // 12
    batch = first[0]
    assert set(batch) == {"input_features", "input_ids", "attention_mask"}
    assert batch["input_features"].shape[:2] == (12, 80)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again,
                                                                         strict=True))
    assert not all(torch.equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(first, loader(1), strict=True))
    texts = model.tokenizer.batch_decode(batch["input_ids"])
    assert all("tone" not in t for t in texts)  # Korean captions only
    # Two ranks split each global batch.
    halves = [next(iter(source(config, model, DistInfo(rank=r, world_size=2))(0)))
              for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h["input_ids"] for h in halves]), batch["input_ids"])

    held = source(_config(tones, tmp_path, "data.options.held_out=true"), model, DistInfo())
    assert len(list(held(0))) == (CLASSES * 3) // 12

    locked = _config(tones, tmp_path, "stage.frozen=[text]")
    cached = list(source(locked, model, DistInfo())(0))[0]
    assert cached["input_ids"].is_floating_point()
    assert cached["input_ids"].shape == (12, model.config.text.width)


def test_loss_falls_in_a_short_run(tones, tmp_path):
    from imagefm.train.launch import run

    folder = run(_config(tones, tmp_path, "train.steps=24", "optim.lr=3e-3",
                         "optim.warmup_steps=3", "run.log_every=1", "run.name=clap"))
    losses = [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 24
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert (folder / "final" / "imagefm.json").is_file()


def test_loss_is_the_clip_loss_of_the_outputs(model):
    from imagefm.train.tasks import ContrastiveTask

    features = model.features(_waves())
    batch = {"input_features": features, **model.tokenizer(["tone 0", "tone 3", "tone 5"])}
    loss, _ = ContrastiveTask("clip").loss(model, batch)
    out = model(features, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(loss, clip_loss(out.image_embeds, out.text_embeds,
                                               out.logit_scale))


def test_evaluation_suite(tones, model, tmp_path):
    import typer
    from typer.testing import CliRunner

    from imagefm.cli import eval as eval_cli
    from imagefm.eval.speech import evaluate_speech

    results = evaluate_speech(model, tones, langs=["en", "ko"])
    kinds = {(r["task"], r["lang"]) for r in results}
    assert kinds == {("classification", "en"), ("classification", "ko"), ("retrieval", "en"),
                     ("retrieval", "ko")}
    for r in results:
        if r["task"] == "classification":
            assert r["n"] == CLASSES * 2 and r["num_classes"] == CLASSES
            assert 0 <= r["top1"] <= 1
        else:  # 6 distinct captions, 6 utterances per caption
            assert r["n_texts"] == CLASSES and r["n_images"] == CLASSES
            assert r["image_to_text"]["R@10"] == 1.0 and r["text_to_image"]["R@10"] == 1.0

    model.save_pretrained(tmp_path / "m")
    app = typer.Typer()
    eval_cli.register(app)
    app.command("noop")(lambda: None)  # a second command keeps "eval" a subcommand
    done = CliRunner().invoke(app, ["eval", str(tmp_path / "m"), "--suite", "speech", "--data",
                                    str(tones), "--lang", "en,ko", "--out", str(tmp_path / "r")])
    assert done.exit_code == 0, done.output
    assert "speech-retrieval" in done.output and (tmp_path / "r" / "results.json").is_file()
