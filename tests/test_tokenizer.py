"""Tokenizer parity with the reference implementations (open_clip, transformers) and behaviour of
the bilingual BPE trainer. Vocabularies are built here: open_clip's shipped CLIP BPE, a tiny
sentencepiece model trained in the test, and a BPE trained on a generated English+Korean corpus.
"""

from __future__ import annotations

import io
import json
import random
import unicodedata
from pathlib import Path

import pytest
import torch

from imagefm.tokenizer import (
    SETTINGS_FILE,
    Tokenizer,
    TokenizerSettings,
    clip_vocab_from_bpe_gz,
    train_bpe,
)

KOREAN_WORDS = (
    "고양이 강아지 자동차 하늘 바다 사진 나무 집 꽃 산 빨간 파란 작은 큰 귀여운 아름다운 위에 옆에 "
    "있다 있는 앉아 달리는 먹는 사람 아이 여자 남자 거리 공원 도시 학교 노란 하얀 검은 새 물 음식"
).split()
ENGLISH_WORDS = (
    "a photo of the cat dog car sky sea tree house flower mountain red blue small big cute "
    "beautiful on next to is sitting running eating person child woman man street park city"
).split()

LONG_CAPTION = " ".join(["a very long caption about a dog, 강아지와 고양이"] * 12)
CLIP_TEXTS = [
    "A photo of a cat.",
    "Hello, World!!! It's 2024 — we're at the café.",
    "고양이가 소파 위에서 자고 있다",
    "빨간 자동차 🚗 와 파란 하늘 ☁️",
    "MiXeD CaSe 한국어 TEXT with   extra    spaces\tand\nnewlines",
    "numbers 1234567 and 3.14159, emoji 😀😃🎉 👨‍👩‍👧",
    "  leading and trailing  ",
    "",
    "punctuation?!... (brackets) [square] {curly} <angle> #hash @at ~tilde",
    "I'll, you've, she'd, they're, don't, IT'S",
    "Straße ΟΔΟΣ İstanbul ÉCOLE naïve",
    "text that spells <|endoftext|> a special token",
    LONG_CAPTION,
]
ENGLISH_TEXTS = [
    "a photo of a cat",
    "A diagram of the Transformer architecture, drawn by hand.",
    "It's 12 o'clock and we're late!!",
    "multiple   spaces\tand tabs",
    " ".join(["a long caption about a small red car parked on the street"] * 10),
]


def _nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


# --------------------------------------------------------------------------------------------
# CLIP BPE
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_clip_tokenizer_module():
    return pytest.importorskip("open_clip.tokenizer")


@pytest.fixture(scope="module")
def clip_files(open_clip_tokenizer_module, tmp_path_factory) -> Path:
    """vocab.json + merges.txt written from open_clip's own tables (independent of our parser)."""
    simple = open_clip_tokenizer_module.SimpleTokenizer()
    hf_names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {hf_names.get(token, token): index for token, index in simple.encoder.items()}
    assert len(vocab) == 49408
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)
    directory = tmp_path_factory.mktemp("clip_vocab")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hf_clip(clip_files):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizerFast.from_pretrained(str(clip_files))


@pytest.fixture(scope="module")
def clip(clip_files) -> Tokenizer:
    return Tokenizer.clip_bpe(clip_files / "vocab.json", clip_files / "merges.txt")


def _hf_batch(hf_tokenizer, texts, length):
    out = hf_tokenizer(
        texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    )
    return out["input_ids"].long(), out["attention_mask"].long()


def test_clip_matches_transformers_on_mixed_english_korean(clip, hf_clip):
    # HF pads with <|endoftext|>; ours pads with 0 like open_clip. Compare with HF's pad as well.
    assert hf_clip.pad_token_id == 49407
    ours = clip.with_settings(pad_id=hf_clip.pad_token_id)(CLIP_TEXTS)
    hf_ids, hf_mask = _hf_batch(hf_clip, CLIP_TEXTS, 77)
    assert torch.equal(ours["input_ids"], hf_ids)
    assert torch.equal(ours["attention_mask"], hf_mask)

    default = clip(CLIP_TEXTS)
    assert torch.equal(default["attention_mask"], hf_mask)
    real = hf_mask.bool()
    assert torch.equal(default["input_ids"][real], hf_ids[real])
    assert (default["input_ids"][~real] == 0).all()


def test_clip_slow_transformers_tokenizer_if_distinct(clip, clip_files):
    transformers = pytest.importorskip("transformers")
    if transformers.CLIPTokenizer is transformers.CLIPTokenizerFast:
        pytest.skip("this transformers has no separate slow CLIP tokenizer")
    slow = transformers.CLIPTokenizer(
        vocab_file=str(clip_files / "vocab.json"), merges_file=str(clip_files / "merges.txt")
    )
    texts = [t for t in CLIP_TEXTS if "<|" not in t]
    hf_ids, _ = _hf_batch(slow, texts, 77)
    ours = clip.with_settings(pad_id=slow.pad_token_id)(texts)
    assert torch.equal(ours["input_ids"], hf_ids)


def test_clip_truncation_keeps_eos_last(clip):
    row = clip(LONG_CAPTION)["input_ids"][0]
    assert len(clip.encode(LONG_CAPTION)) == 77
    assert row[0].item() == clip.bos_id == 49406
    assert row[-1].item() == clip.eos_id == 49407
    # CLIP pools at the EOS found by argmax: it must be the last position of a full row.
    assert row.argmax().item() == 76


def test_clip_matches_open_clip_tokenize(open_clip_tokenizer_module, clip_files):
    open_clip = pytest.importorskip("open_clip")
    expected = open_clip.tokenize(ENGLISH_TEXTS)
    simple = open_clip_tokenizer_module.SimpleTokenizer()
    assert torch.equal(simple(ENGLISH_TEXTS), expected)
    gz_path = open_clip_tokenizer_module.default_bpe()
    for ours in (
        Tokenizer.from_open_clip(),
        Tokenizer.clip_bpe(bpe_gz=gz_path),
        Tokenizer.clip_bpe(clip_files / "vocab.json", clip_files / "merges.txt"),
    ):
        got = ours(ENGLISH_TEXTS)
        assert torch.equal(got["input_ids"], expected)
        assert ours.pad_id == 0 and ours.vocab_size == 49408
        for text in ENGLISH_TEXTS[:3]:
            assert ours.encode(text)[1:-1] == simple.encode(text)
    vocab, _ = clip_vocab_from_bpe_gz(gz_path)
    assert json.loads((clip_files / "vocab.json").read_text(encoding="utf-8")) == vocab


def test_clip_nfd_korean_gives_nfc_ids(clip):
    for text in CLIP_TEXTS[2:5]:
        assert _nfd(text) != text
        assert clip.encode(_nfd(text)) == clip.encode(text)


def test_clip_decode_matches_transformers(clip, hf_clip):
    for text in CLIP_TEXTS[:6]:
        row = clip(text)["input_ids"][0]
        hf_ids = hf_clip(text)["input_ids"]
        assert clip.decode(row) == hf_clip.decode(hf_ids, skip_special_tokens=True)
    assert clip.decode(clip("안녕하세요 고양이")["input_ids"][0]) == "안녕하세요 고양이"


def test_clip_from_hf_dir_reads_saved_transformers_tokenizer(clip_files, hf_clip, tmp_path):
    saved = tmp_path / "hf_clip"
    hf_clip.save_pretrained(str(saved))
    ours = Tokenizer.from_hf_dir(saved)
    hf_ids, hf_mask = _hf_batch(hf_clip, CLIP_TEXTS, 77)
    got = ours(CLIP_TEXTS)
    assert torch.equal(got["input_ids"], hf_ids)  # pad id read from the saved config
    assert torch.equal(got["attention_mask"], hf_mask)

    # Older checkpoints ship only vocab.json + merges.txt with a config.
    bare = tmp_path / "bare_clip"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bare / name).write_bytes((clip_files / name).read_bytes())
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "!"}
    (bare / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    from_bare = Tokenizer.from_hf_dir(bare)
    assert from_bare.pad_id == 0
    assert torch.equal(from_bare(CLIP_TEXTS)["input_ids"][hf_mask.bool()], hf_ids[hf_mask.bool()])


def test_clip_save_pretrained_round_trip(clip, tmp_path):
    clip.save_pretrained(tmp_path / "tok")
    loaded = Tokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.settings() == clip.settings()
    assert torch.equal(loaded(CLIP_TEXTS)["input_ids"], clip(CLIP_TEXTS)["input_ids"])
    # Settings given from elsewhere (a checkpoint's imagefm.json) take the file's place.
    settings = {**clip.settings(), "context_length": 16}
    shorter = Tokenizer.from_pretrained(tmp_path / "tok", settings=settings)
    assert shorter(CLIP_TEXTS)["input_ids"].shape == (len(CLIP_TEXTS), 16)


def test_padding_longest(clip):
    longest = clip.with_settings(padding="longest")
    texts = ["a cat", "a photo of a small red car"]
    batch = longest(texts)
    lengths = [len(clip.encode(t)) for t in texts]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert torch.equal(batch["input_ids"], clip(texts)["input_ids"][:, : max(lengths)])


# --------------------------------------------------------------------------------------------
# SigLIP (sentencepiece)
# --------------------------------------------------------------------------------------------


def _synthetic_sentences(rng: random.Random, count: int) -> list[str]:
    syllables = "ka ro mi tan sel vo pu rin de lo ga shi ter mon ab ex qu".split()
    words = ENGLISH_WORDS + [
        "".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)
    ]
    words += KOREAN_WORDS
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(count)]


@pytest.fixture(scope="module")
def spiece_model(tmp_path_factory) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    sentences = _synthetic_sentences(random.Random(0), 500)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=300,
        model_type="unigram",
        character_coverage=1.0,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def hf_siglip(spiece_model):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers' SiglipTokenizer needs protobuf")
    return transformers.SiglipTokenizer(str(spiece_model))


SIGLIP_TEXTS = [
    "A photo of a CAT!!",
    "  고양이,   사진.  빨간 자동차 ",
    "Hello, World... it's (really) #1?",
    "!!!",
    "",
    "tab\tand\nnewline   spaces",
    "cat_dog tree-house",
    "unknown glyphs 😀 ΩΨ",
    " ".join(["a photo of the cat on the tree next to a house"] * 8),
]


def test_siglip_matches_transformers(spiece_model, hf_siglip):
    ours = Tokenizer.from_sentencepiece(spiece_model)
    assert ours.pad_id == ours.eos_id == hf_siglip.pad_token_id == hf_siglip.eos_token_id
    assert ours.bos_id is None
    hf_ids, hf_mask = _hf_batch(hf_siglip, SIGLIP_TEXTS, 64)
    got = ours(SIGLIP_TEXTS)
    assert got["input_ids"].shape == (len(SIGLIP_TEXTS), 64)
    assert torch.equal(got["input_ids"], hf_ids)
    assert torch.equal(got["attention_mask"], hf_mask)
    assert got["input_ids"][-1, -1].item() == ours.eos_id  # truncated, EOS kept
    # Canonicalisation: case, punctuation and whitespace do not change ids.
    assert ours.encode("A photo, of a CAT!!") == ours.encode("a photo of a cat")


def test_siglip_nfd_korean_and_round_trips(spiece_model, hf_siglip, tmp_path):
    ours = Tokenizer.from_sentencepiece(spiece_model)
    assert ours.encode(_nfd(SIGLIP_TEXTS[1])) == ours.encode(SIGLIP_TEXTS[1])
    assert ours.decode(ours("Red CAR, 빨간 자동차!")["input_ids"][0]) == "red car 빨간 자동차"

    ours.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "spiece.model").is_file()
    loaded = Tokenizer.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded(SIGLIP_TEXTS)["input_ids"], ours(SIGLIP_TEXTS)["input_ids"])

    hf_siglip.save_pretrained(str(tmp_path / "hf"))
    from_hf = Tokenizer.from_hf_dir(tmp_path / "hf")
    assert from_hf.settings() == ours.settings()
    hf_ids, _ = _hf_batch(hf_siglip, SIGLIP_TEXTS, 64)
    assert torch.equal(from_hf(SIGLIP_TEXTS)["input_ids"], hf_ids)


# --------------------------------------------------------------------------------------------
# Bilingual BPE training
# --------------------------------------------------------------------------------------------


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))


@pytest.fixture(scope="module")
def bilingual() -> Tokenizer:
    rng = random.Random(1)
    corpus = [_sentence(rng, KOREAN_WORDS) for _ in range(1000)]
    corpus += [_sentence(rng, ENGLISH_WORDS) for _ in range(1000)]
    rng.shuffle(corpus)
    return train_bpe(corpus, vocab_size=800)


def test_train_bpe_specials_and_layout(bilingual):
    row = bilingual("고양이 a cat")["input_ids"][0]
    assert row.shape == (77,)
    assert row[0].item() == bilingual.bos_id == bilingual.token_to_id("<|startoftext|>")
    length = len(bilingual.encode("고양이 a cat"))
    assert row[length - 1].item() == bilingual.eos_id == bilingual.token_to_id("<|endoftext|>")
    assert (row[length:] == bilingual.pad_id).all()
    assert bilingual.pad_id == bilingual.token_to_id("<pad>")
    assert len({bilingual.bos_id, bilingual.eos_id, bilingual.pad_id}) == 3


def test_train_bpe_round_trip_english_korean_emoji(bilingual):
    for text in [
        "a cute cat sitting on the tree",
        "귀여운 고양이가 나무 위에 앉아 있다",
        "Mixed 한국어 and English 😀 with  two spaces, punctuation! and 123",
        "처음 보는 단어들: 햇살, 무지개, 돌고래",
    ]:
        assert bilingual.decode(bilingual.encode(text)) == text.lower()


def test_train_bpe_compresses_korean(bilingual):
    rng = random.Random(7)
    held_out = [_sentence(rng, KOREAN_WORDS) for _ in range(50)]
    n_tokens = sum(len(bilingual.encode(t)) - 2 for t in held_out)
    n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
    n_syllables = sum(len(t.replace(" ", "")) for t in held_out)
    # Untrained byte-level BPE spends 3 tokens per syllable; trained, whole words are single tokens.
    assert n_tokens < 0.6 * n_syllables
    assert n_tokens < n_bytes / 5


def test_train_bpe_nfd_hangul_never_jamo(bilingual):
    text = "빨간 자동차와 파란 하늘"
    nfd = _nfd(text)
    assert len(nfd) > len(text)
    assert bilingual.encode(nfd) == bilingual.encode(text)
    assert bilingual.decode(bilingual.encode(nfd)) == text


def test_nfc_applies_even_when_the_backend_has_no_normaliser(bilingual, tmp_path):
    bilingual.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    bare = Tokenizer.from_file(tmp_path / "tokenizer.json", **bilingual.settings())
    text = "귀여운 고양이"
    assert bare.encode(_nfd(text)) == bare.encode(text) == bilingual.encode(text)


def test_train_bpe_save_pretrained_round_trip(bilingual, tmp_path):
    texts = ["a red car 빨간 자동차", "처음 보는 문장 😀", ""]
    bilingual.save_pretrained(tmp_path)
    saved_settings = json.loads((tmp_path / SETTINGS_FILE).read_text(encoding="utf-8"))
    assert saved_settings == bilingual.settings()
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert torch.equal(loaded(texts)["input_ids"], bilingual(texts)["input_ids"])
    assert [loaded.encode(t) for t in texts] == [bilingual.encode(t) for t in texts]
    # tokenizer.json is a plain `tokenizers` file: usable on its own with explicit settings.
    from_file = Tokenizer.from_file(tmp_path / "tokenizer.json", **bilingual.settings())
    assert from_file.encode(texts[0]) == bilingual.encode(texts[0])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_files_name_path_and_expectation(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json.*expected a BPE vocabulary"):
        Tokenizer.clip_bpe(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(FileNotFoundError, match=SETTINGS_FILE):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*spiece\.model"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        Tokenizer.from_sentencepiece(tmp_path / "spiece.model")
    with pytest.raises(ValueError, match="vocab_json and merges_txt, or bpe_gz"):
        Tokenizer.clip_bpe()


def test_from_open_clip_without_open_clip(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match="open_clip is not installed"):
        Tokenizer.from_open_clip()


def test_bad_settings_are_refused(bilingual):
    with pytest.raises(ValueError, match="unknown tokenizer settings"):
        TokenizerSettings.from_dict({"context_length": 77, "pad_to": 77})
    with pytest.raises(ValueError, match="padding"):
        bilingual.with_settings(padding="right")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bilingual.with_settings(pad_id=bilingual.vocab_size)
    strict = bilingual.with_settings(truncation=False, context_length=8)
    with pytest.raises(ValueError, match="truncation is off"):
        strict("a cute cat sitting on the tree next to the house")
    with pytest.raises(TypeError, match="must be str"):
        bilingual([b"bytes"])
