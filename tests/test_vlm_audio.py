"""Speech into the LLaVA-style VLM: the audio placeholder contract, the forward pass with a
picture and a spoken clip, saving and loading with the audio tower, ``input_audio`` content parts
of the chat server and ``imagefm ask --audio``."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import imagefm
from imagefm.apps.vlm_chat import stream_reply
from imagefm.config import ConfigError
from imagefm.data.speech import espeak_available
from imagefm.models.audio_input import AudioInputConfig
from imagefm.models.vlm import VLM, VLMConfig, add_audio
from imagefm.models.whisper_encoder import audio_preset
from imagefm.vlm_processor import VLMProcessor

pytest.importorskip("soundfile")
N = 6  # new tokens per reply
RATE = 16000


def tiny_encoder():
    return audio_preset("audio-tiny", d_model=32, encoder_layers=1, encoder_attention_heads=2,
                        encoder_ffn_dim=64, max_source_positions=100)


@pytest.fixture
def speech_vlm(tiny_vlm: VLM) -> VLM:
    """The conftest's tiny VLM with a tiny audio tower: 1 s clips, 50 encoder frames, 5 stacked
    into each of 10 audio tokens."""
    return add_audio(tiny_vlm, tiny_encoder(), seconds=1.0, stack=5).eval()


def clip(seed: int, seconds: float = 0.7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * rng.uniform(200, 800) * t)).astype(np.float32)


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)


def wav_bytes(wave: np.ndarray) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, wave, RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def spoken(processor: VLMProcessor) -> list[dict]:
    return [{"role": "user", "content": f"{processor.image_marker}\n{processor.audio_marker}"}]


def test_audio_placeholders_by_contract(speech_vlm: VLM) -> None:
    audio = speech_vlm.config.audio
    assert (audio.mel_frames, audio.encoder_frames, audio.tokens) == (100, 50, 10)
    assert speech_vlm.audio(torch.zeros(2, 80, audio.mel_frames)).shape == (2, 10, 32)
    processor = VLMProcessor.for_model(speech_vlm)
    batch = processor.prompt([spoken(processor)], [picture(0)], audios=[clip(0)])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(audio.token_id) == audio.tokens
    assert ids.count(speech_vlm.config.image_token_id) == speech_vlm.config.image_tokens
    assert batch["input_features"].shape == (1, 80, audio.mel_frames)
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "input_audio"}]}]
    assert torch.equal(processor.prompt([parts], [picture(0)], audios=[clip(0)])["input_ids"],
                       batch["input_ids"])  # content parts: the same layout as the string
    # Shorter and longer clips are padded or cut to the same frames.
    assert processor.audio_features([clip(1, 0.2), clip(2, 3.0)]).shape == (2, 80, 100)
    with pytest.raises(ValueError, match="1 audio placeholder"):
        processor.prompt([spoken(processor)], [picture(0)])
    with pytest.raises(ValueError, match="need 20"):  # one clip's slots, two clips' tokens
        speech_vlm(batch["input_ids"], batch["pixel_values"],
                   input_features=torch.zeros(2, 80, audio.mel_frames))
    with pytest.raises(ValueError, match="no audio input"):
        speech_vlm(batch["input_ids"], batch["pixel_values"])


def test_forward_with_picture_and_speech(speech_vlm: VLM) -> None:
    processor = VLMProcessor.for_model(speech_vlm)
    messages = spoken(processor) + [{"role": "assistant", "content": "a small cat"}]
    examples = [processor.training_example(messages)] * 2
    batch = processor.collate(examples, images=[picture(0), picture(1)],
                              audios=[clip(0), clip(1)])
    out = speech_vlm(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert speech_vlm.audio.projector.fc1.weight.grad.abs().sum() > 0
    assert speech_vlm.audio.encoder.conv1.weight.grad.abs().sum() > 0
    # The audio rows are the projected clip: a different clip changes the logits, the same
    # clip in another row gives the same logits there.
    speech_vlm.zero_grad()
    with torch.no_grad():
        same = processor.collate(examples, [picture(0)] * 2, [clip(0), clip(0)])
        other = processor.collate(examples, [picture(0)] * 2, [clip(0), clip(5)])
        a = speech_vlm(same["input_ids"], same["pixel_values"], same["attention_mask"],
                       input_features=same["input_features"]).logits
        b = speech_vlm(other["input_ids"], other["pixel_values"], other["attention_mask"],
                       input_features=other["input_features"]).logits
    torch.testing.assert_close(a[0], a[1])
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_save_and_load_with_the_audio_tower(speech_vlm: VLM, tiny_vlm_dir: Path) -> None:
    speech_vlm.save_pretrained(tiny_vlm_dir)
    loaded = imagefm.load(tiny_vlm_dir).eval()
    assert loaded.config == speech_vlm.config
    for (name, a), (_, b) in zip(speech_vlm.state_dict().items(),
                                 loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    processor = VLMProcessor.from_pretrained(tiny_vlm_dir)
    assert processor.audio == speech_vlm.config.audio
    reply = "".join(stream_reply(speech_vlm, spoken(processor), [picture(0)],
                                 audios=[clip(0)], max_new_tokens=N))
    assert reply == "".join(stream_reply(loaded, spoken(processor), [picture(0)],
                                         audios=[clip(0)], max_new_tokens=N))
    # A VLM without audio keeps its old config (no audio key needed) and refuses clips.
    plain = VLMConfig.from_dict({k: v for k, v in speech_vlm.config.to_dict().items()
                                 if k != "audio"})
    assert plain.audio is None
    with pytest.raises(ConfigError, match="audio.token_id"):
        speech_vlm.config.replace(audio=AudioInputConfig(
            tiny_encoder(), token_id=speech_vlm.config.image_token_id, seconds=1.0))


@pytest.fixture
def tiny_vlm_dir(tmp_path: Path) -> Path:
    return tmp_path / "speech-vlm"


def test_server_takes_input_audio_parts(speech_vlm: VLM) -> None:
    from fastapi.testclient import TestClient

    from imagefm.serve.chat import create_chat_app
    from imagefm.serve.settings import ServeSettings

    processor = VLMProcessor.for_model(speech_vlm)
    # The default settings: continuous batching (serve/continuous.py) decodes the reply.
    app = create_chat_app(speech_vlm, processor, ServeSettings(), "speech")
    png = io.BytesIO()
    from PIL import Image

    Image.fromarray(picture(0)).save(png, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    wave = clip(0)
    audio_part = {"type": "input_audio",
                  "input_audio": {"data": base64.b64encode(wav_bytes(wave)).decode(),
                                  "format": "wav"}}
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, audio_part]}],
        "max_tokens": N, "temperature": 0}
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()["choices"][0]["message"]["content"]
        # The same as asking directly with the clip as the server decoded it (16-bit WAV).
        from imagefm.data.audio import load_audio

        decoded = load_audio(wav_bytes(wave), RATE)
        expected = "".join(stream_reply(speech_vlm, spoken(processor), [picture(0)],
                                        audios=[decoded], max_new_tokens=N))
        assert answer == expected
        bad = {**audio_part, "input_audio": {"data": "not base64!", "format": "wav"}}
        body["messages"][0]["content"][1] = bad
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and "base64" in response.text
        body["messages"][0]["content"][1] = {**audio_part, "input_audio": {
            "data": base64.b64encode(b"RIFF....garbage").decode(), "format": "wav"}}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400 and "cannot decode the audio" in response.text


def test_server_refuses_audio_for_a_model_without_an_audio_tower(tiny_vlm: VLM) -> None:
    from fastapi.testclient import TestClient

    from imagefm.serve.chat import create_chat_app
    from imagefm.serve.settings import ServeSettings

    app = create_chat_app(tiny_vlm, None, ServeSettings(chat_slots=1), "plain")
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [part]}], "max_tokens": 2})
    assert response.status_code == 400 and "no audio tower" in response.text


def test_ask_audio_command(speech_vlm: VLM, tmp_path: Path) -> None:
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from imagefm.cli.chat import register

    model_dir = tmp_path / "vlm"
    speech_vlm.save_pretrained(model_dir)
    image, audio = tmp_path / "p.png", tmp_path / "q.wav"
    Image.fromarray(picture(0)).save(image)
    audio.write_bytes(wav_bytes(clip(0)))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a Typer app with one command would take no name
    result = CliRunner().invoke(app, ["ask", "--audio", str(audio), "--image", str(image),
                                      "--model", str(model_dir), "-n", str(N)])
    assert result.exit_code == 0, result.output
    from imagefm.data.audio import load_audio

    processor = VLMProcessor.for_model(speech_vlm)
    expected = "".join(stream_reply(speech_vlm, spoken(processor), [Image.open(image)],
                                    audios=[load_audio(audio, RATE)], max_new_tokens=N))
    assert result.stdout == expected + "\n"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    result = CliRunner().invoke(app, ["ask", "--audio", str(bad), "--image", str(image),
                                      "--model", str(model_dir)])
    assert result.exit_code == 2 and "cannot read audio" in result.output


espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed")


@espeak
def test_spoken_questions_source(speech_vlm: VLM) -> None:
    from imagefm.models.decoder import IGNORE_INDEX
    from imagefm.train.speech_vlm_data import SpokenQuestions

    processor = VLMProcessor.for_model(speech_vlm)
    source = SpokenQuestions(processor, batch_size=4, text_fraction=0.5, examples_per_epoch=8)
    batches = list(source(0))
    assert len(batches) == 2
    audio_id, image_id = speech_vlm.config.audio.token_id, speech_vlm.config.image_token_id
    spoken_rows = 0
    for batch in batches:
        ids, labels = batch["input_ids"], batch["labels"]
        per_row = (ids == audio_id).sum(1)
        assert set(per_row.tolist()) <= {0, speech_vlm.config.audio.tokens}
        clips = int((per_row > 0).sum())
        spoken_rows += clips
        assert clips == (batch["input_features"].shape[0] if "input_features" in batch else 0)
        assert ((ids == image_id).sum(1) == speech_vlm.config.image_tokens).all()
        assert (labels[(ids == audio_id) | (ids == image_id)] == IGNORE_INDEX).all()
        assert ((labels != IGNORE_INDEX).sum(1) > 0).all()  # every row learns its answer
    assert 0 < spoken_rows < 8  # both spoken and text questions at text_fraction 0.5
    again = next(iter(source(0)))  # deterministic given the epoch
    for key, value in batches[0].items():
        assert torch.equal(value, again[key]), key
    # Transcriptions: the clip alone, and the question's words as the labels.
    from imagefm.train.speech_vlm_data import scene_question

    asr = SpokenQuestions(processor, batch_size=2, transcribe_fraction=1.0, examples_per_epoch=2)
    batch = next(iter(asr(0)))
    assert "pixel_values" not in batch and batch["input_features"].shape[0] == 2
    assert not (batch["input_ids"] == image_id).any()
    for row, lang in enumerate(("en", "ko")):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        question = scene_question(row, lang=lang, seed=0, image_size=32)[2]
        assert processor.decode(labelled).startswith(question)


@espeak
def test_the_align_stage_trains_the_audio_side(speech_vlm: VLM, tmp_path: Path) -> None:
    from imagefm.train.config import load_config
    from imagefm.train.launch import run

    speech_vlm.save_pretrained(tmp_path / "init")
    start = imagefm.load(tmp_path / "init").state_dict()
    folder = run(load_config(None, [
        f"model.init={tmp_path / 'init'}", "task.name=vlm", "data.source=vlm-speech",
        "data.batch_size=2", "train.steps=2", "optim.warmup_steps=1", "optim.lr=1e-2",
        "stage.preset=align", "stage.frozen=[projector]", f"run.output_dir={tmp_path}",
        "run.name=speech", "run.progress=false", "run.tensorboard=false"]))
    state = imagefm.load(folder / "final").state_dict()
    changed = {k.split(".")[0] for k in state if not torch.equal(state[k], start[k])}
    assert changed == {"audio"}  # vision, image projector and LM frozen


@espeak
def test_spoken_vqa_evaluation(speech_vlm: VLM) -> None:
    from imagefm.eval.speech_vqa import evaluate_spoken_vqa, speech_vqa_markdown
    from imagefm.eval.vqa import evaluate_vqa

    processor = VLMProcessor.for_model(speech_vlm)
    results = evaluate_spoken_vqa(speech_vlm, processor, n=2, langs=("ko",), batch_size=2)
    assert all(r.total == 2 for r in results.values())
    # The text rows are exactly vlm-eval's answers to the same questions (with and without
    # the picture).
    for mode, blind in (("text", False), ("text-blind", True)):
        reference = evaluate_vqa(speech_vlm, processor, n=2, langs=("ko",), blind=blind)
        assert [e["predicted"] for e in results[mode].examples] == [
            e["predicted"] for e in reference.examples]
    assert results["spoken"].examples[0]["question"] == reference.examples[0]["question"]
    table = speech_vqa_markdown(results, ["ko"])
    assert table.count("\n") == 2 + len(results)


def test_add_audio_keeps_a_trained_encoder(tiny_vlm: VLM) -> None:
    from imagefm.models.whisper_encoder import AudioEncoder

    encoder = AudioEncoder(tiny_encoder())
    vlm = add_audio(tiny_vlm, encoder, seconds=1.0, stack=5)
    for name, value in encoder.state_dict().items():
        assert torch.equal(vlm.audio.encoder.state_dict()[name], value), name
    assert vlm.tokenizer.token_to_id("<audio>") == vlm.config.audio.token_id
    assert vlm.config.lm.vocab_size == vlm.lm.embed_tokens.weight.shape[0]
    with pytest.raises(ConfigError, match="already has an audio tower"):
        add_audio(vlm, tiny_encoder())
