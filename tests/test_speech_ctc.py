"""CTC pre-training of an audio tower: the loss against brute force, greedy decoding (blanks,
repeats, Hangul jamo), a tiny tower learning toy transcripts, the speech-ctc source + asr_ctc task
through the Trainer, the tower handed to a VLM, and the character error rate."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.config import ConfigError
from imagefm.data.speech import espeak_available
from imagefm.eval.speech_ctc import character_error_rate, edit_distance
from imagefm.losses import ctc_loss
from imagefm.models.speech_ctc import (
    BLANK,
    SpeechCTC,
    SpeechCTCConfig,
    greedy_decode,
    ids_to_text,
    transcript_ids,
)
from imagefm.models.whisper_encoder import audio_preset

espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")
TINY = {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "max_source_positions": 100, "num_mel_bins": 16}


def tiny_config(alphabet: str = "abc") -> SpeechCTCConfig:
    from imagefm.models.audio_features import MelConfig

    encoder = audio_preset("audio-tiny", **TINY, mel=MelConfig(n_mels=16, chunk_seconds=None))
    return SpeechCTCConfig(encoder, alphabet=alphabet, seconds=0.2)  # 20 mel frames


def collapse(path: tuple[int, ...]) -> list[int]:
    out = [k for i, k in enumerate(path) if k != BLANK and (i == 0 or path[i - 1] != k)]
    return out


def test_ctc_loss_equals_the_sum_over_all_alignments() -> None:
    torch.manual_seed(0)
    frames, classes = 4, 3
    logits = torch.randn(2, frames, classes)
    targets = torch.tensor([[1, 2], [1, 1]])  # the second needs a blank between the two 1s
    lengths = torch.tensor([2, 2])
    log_probs = logits.log_softmax(-1)
    expected = []
    for row in range(2):
        total = sum(math.exp(sum(float(log_probs[row, t, k]) for t, k in enumerate(path)))
                    for path in itertools.product(range(classes), repeat=frames)
                    if collapse(path) == targets[row].tolist())
        expected.append(-math.log(total) / 2)  # divided by the target length
    got = ctc_loss(logits, targets, lengths)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    # A target that cannot fit its frames (5 labels in 4 frames) costs 0, not inf.
    assert ctc_loss(logits[:1], torch.tensor([[1, 2, 1, 2, 1]]), torch.tensor([5])).item() == 0


def test_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    path = [1, 1, BLANK, 1, 2, 2, BLANK, BLANK, 3]
    logits = torch.nn.functional.one_hot(torch.tensor([path]), 4).float()
    assert greedy_decode(logits) == [[1, 1, 2, 3]]
    assert greedy_decode(logits, lengths=[5]) == [[1, 1, 2]]
    alphabet = SpeechCTCConfig.__dataclass_fields__["alphabet"].default
    for text, written in (("What colour is the circle?", "what colour is the circle"),
                          ("노란 도형은 어떤 모양인가요?", "노란 도형은 어떤 모양인가요")):
        ids = transcript_ids(text, alphabet)
        assert BLANK not in ids and ids_to_text(ids, alphabet) == written
    # Hangul goes in as jamo: 노 is two letters, 란 three.
    assert len(transcript_ids("노란", alphabet)) == 5


def test_a_tiny_tower_learns_toy_transcripts() -> None:
    torch.manual_seed(0)
    model = SpeechCTC(tiny_config())
    features = torch.randn(3, 16, 20)
    texts = ["ab", "ca", "bb"]
    targets = torch.tensor([transcript_ids(t, "abc") for t in texts])
    lengths = torch.tensor([2, 2, 2])
    assert model(features).shape == (3, 10, 4)  # ceil(20 / 2) frames, blank + 3 letters
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = ctc_loss(model(features), targets, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert model.eval().transcribe(features) == texts


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="without repeats"):
        tiny_config("aab")
    with pytest.raises(ConfigError, match="mel frames"):
        SpeechCTCConfig(tiny_config().encoder, seconds=5.0)  # 500 frames > 200
    from imagefm.train.asr import synthesize_clips

    with pytest.raises(ConfigError, match="held-out"):  # evaluation's unheard speaker stays so
        synthesize_clips(tiny_config(), clips=1, extra_voices={"en": ["en-gb-scotland+f4"]})


def test_character_error_rate() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert character_error_rate(["abcd", "ef"], ["abd", "xf"]) == pytest.approx(2 / 6)


@espeak
def test_speech_ctc_training_and_handing_the_tower_to_a_vlm(tmp_path: Path, tiny_vlm) -> None:
    from imagefm.models.vlm import add_audio
    from imagefm.train.config import load_config
    from imagefm.train.launch import run

    overrides = ["model.preset=speech-ctc-tiny", "task.name=asr_ctc", "data.source=speech-ctc",
                 "data.batch_size=4", "data.options.clips=8", "data.options.augment=0.5",
                 f"data.options.cache={tmp_path / 'clips.pt'}", "train.steps=3",
                 "optim.warmup_steps=1", "run.progress=false", "run.tensorboard=false",
                 f"run.output_dir={tmp_path}", "run.name=ctc", "model.config.seconds=1.0",
                 "model.config.encoder.d_model=32", "model.config.encoder.encoder_layers=1",
                 "model.config.encoder.encoder_attention_heads=2",
                 "model.config.encoder.encoder_ffn_dim=64"]
    folder = run(load_config(None, overrides))
    stored = torch.load(tmp_path / "clips.pt", weights_only=True)
    assert stored["features"].shape == (8, 80, 100) and stored["features"].dtype == torch.float16
    assert any("\uac00" <= c <= "\ud7a3" for c in stored["texts"][1])  # every other one Korean
    recogniser = imagefm.load(folder / "final")
    assert isinstance(recogniser, SpeechCTC) and recogniser.config.seconds == 1.0
    assert len(recogniser.transcribe(stored["features"][:2].float())) == 2
    # The cache is reused (same options: same fingerprint), not written again.
    written = (tmp_path / "clips.pt").stat().st_mtime_ns
    folder = run(load_config(None, [*overrides, "run.name=ctc2", "train.steps=1"]))
    assert (folder / "final").is_dir() and (tmp_path / "clips.pt").stat().st_mtime_ns == written
    with pytest.raises(ConfigError, match="asr_ctc"):
        run(load_config(None, [*overrides, "task.name=contrastive", "run.name=bad"]))
    with pytest.raises(ConfigError, match="--seconds 1"):
        add_audio(tiny_vlm, recogniser, seconds=2.0, stack=5)
    vlm = add_audio(tiny_vlm, recogniser, seconds=1.0, stack=5)
    for name, value in recogniser.encoder.state_dict().items():
        assert torch.equal(vlm.audio.encoder.state_dict()[name], value), name
