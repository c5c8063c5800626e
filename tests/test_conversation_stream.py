"""data.source = conversation-stream: VLM fine-tuning on streamed conversations.

A tiny random Qwen2-VL (tests/test_qwen2_vl.py's; images of any size become 2 to 9 tokens)
reads conversations written here as OpenAI/LLaVA JSONL and as shards of our layout. Checked:
each conversation gives the tensors the in-memory ``conversations`` source gives it; batches are
the codec's collate of their rows; two ranks split the global batches and cover every
conversation once; skip_batches resumes exactly (length-grouped too); bad conversations are
skipped and counted by reason; held-out batches read the test shards in order; a short run's
loss falls.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
    pytest.skip("the reference is built with transformers 5", allow_module_level=True)
from test_qwen2_vl import _reference_processor, _tokenizer, tiny_qwen2_vl  # noqa: E402
from vlm_fixtures import noise_image  # noqa: E402

import imagefm  # noqa: E402
from imagefm.config import ConfigError  # noqa: E402
from imagefm.data.conversations import read_conversations  # noqa: E402
from imagefm.data.formats import ShardWriter  # noqa: E402
from imagefm.data.records import Record, Turn  # noqa: E402
from imagefm.models.decoder import IGNORE_INDEX  # noqa: E402
from imagefm.train.config import load_config  # noqa: E402
from imagefm.train.conversation_stream import conversation_stream_source  # noqa: E402
from imagefm.train.conversations import (  # noqa: E402
    ConversationBatches,
    codec_for,
    collate,
    conversation_example,
)
from imagefm.train.distributed import DistInfo  # noqa: E402
from imagefm.train.launch import eval_data_config, run  # noqa: E402
from imagefm.train.metrics import read_metrics  # noqa: E402

SIZES = {"red": (40, 40), "wide": (30, 90), "tall": (80, 28), "big": (84, 84), "tiny": (9, 12)}


def _png(name: str) -> bytes:
    buffer = io.BytesIO()
    noise_image(*SIZES[name], seed=len(name)).save(buffer, "PNG")
    return buffer.getvalue()


def _llava(image: str | list[str] | None, *turns: str) -> dict:
    entry: dict = {"conversations": [{"from": ("human", "gpt")[i % 2], "value": text}
                                     for i, text in enumerate(turns)]}
    return entry if image is None else {"image": image, **entry}


def _openai(image: str | None, question: str, reply: str, system: str | None = None) -> dict:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": reply}]
    return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}


# Eight usable conversations: one or two images of odd sizes, none, no <image> placeholder,
# Korean, several turns, a system prompt; replies of different lengths.
GOOD = [
    _llava("red.png", "<image>\nWhat is in the picture?", "A red square."),
    _llava(["wide.png", "tall.png"], "<image>\n<image>\nDescribe both images.",
           "A wide one and a tall one, both noisy, both small."),
    _llava("big.png", "<image>\n이 사진에 무엇이 있나요?", "고양이 사진입니다.", "무슨 색이에요?",
           "여러 색이에요."),
    _llava("tiny.png", "What colour is it?", "Grey, mostly."),
    _openai("wide.png", "Is it wide?", "Yes, it is wide."),
    _openai("tall.png", "And this one?", "This one is tall and thin.", "You are terse."),
    _llava(None, "Say hello.", "Hello!"),
    _openai("big.png", "How big?", "Big: eighty-four pixels on each side, the largest here."),
]
# Unusable: a missing image, a corrupt one, too long for the context (512), a line that is no
# JSON, a conversation whose assistant turn holds an image.
BAD = [
    json.dumps(_openai("nowhere.png", "And this?", "Nothing.")),
    json.dumps(_llava("broken.png", "<image>\nWhat is it?", "?")),
    json.dumps(_llava("red.png", "<image>\nCount.", " ".join(["one two three"] * 200))),
    '{"messages": [',
    json.dumps(_llava("red.png", "Look.", "<image> here")),
]


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chats")
    for name in SIZES:
        (root / f"{name}.png").write_bytes(_png(name))
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    good = _write_jsonl(root / "good.jsonl",
                        [json.dumps(e, ensure_ascii=False) for e in GOOD])
    bad = _write_jsonl(root / "bad.jsonl", BAD)
    # The single-image and text-only LLaVA conversations again, as records in shards (our
    # layout: the image bytes and the turns), and as a JSONL file for the in-memory source.
    picked = [e for e in GOOD if "conversations" in e and not isinstance(e.get("image"), list)]
    with ShardWriter(root / "shards", prefix="train", max_samples=2) as writer:
        for index, entry in enumerate(picked):
            turns = [Turn({"human": "user", "gpt": "assistant"}[t["from"]], t["value"])
                     for t in entry["conversations"]]
            image = _png(entry["image"][:-4]) if "image" in entry else None
            writer.write(Record(key=f"chat{index}", image=image, conversation=turns))
    same = _write_jsonl(root / "shards.jsonl",
                        [json.dumps(e, ensure_ascii=False) for e in picked])
    return {"root": root, "good": good, "bad": bad, "shards": root / "shards",
            "shards_jsonl": same}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    tokenizer = _tokenizer()
    directory = tmp_path_factory.mktemp("qwen2_vl")
    tiny_qwen2_vl(tokenizer).save_pretrained(directory)
    _reference_processor(tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(qwen_dir: Path):
    return imagefm.load(qwen_dir)


def _config(qwen_dir: Path, path: Path, *overrides: str):
    return load_config(None, [f"model.init={qwen_dir}", "task.name=vlm",
                              "data.source=conversation-stream", f"data.path={path}",
                              "run.progress=false", "run.tensorboard=false", *overrides])


def _batches(qwen_dir, model, path, *overrides, rank=0, world=1, epoch=0, skip=0):
    loader = conversation_stream_source(_config(qwen_dir, path, *overrides), model,
                                        DistInfo(rank=rank, world_size=world))(epoch)
    loader.skip_batches(skip)
    return list(loader), loader


def _rows(batch: dict) -> list[tuple[int, ...]]:
    """Each row's token ids (without its padding): which conversation it is."""
    return [tuple(ids[:n].tolist()) for ids, n in
            zip(batch["input_ids"], batch["attention_mask"].sum(1).tolist(), strict=True)]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _by_conversation(batches: list[dict]) -> dict[tuple[int, ...], dict]:
    out = {}
    for batch in batches:
        (row,) = _rows(batch)
        assert row not in out
        out[row] = batch
    return out


@pytest.mark.parametrize("source", ["good", "shards"])
def test_each_conversation_gives_what_the_in_memory_source_gives(files, qwen_dir, model,
                                                                 source):
    """One conversation per batch: the stream's batches are the in-memory source's, tensor for
    tensor (input_ids, labels, attention_mask, pixel_values, image_grid_thw), in another order.
    Shards of our layout give what the same conversations give from a JSONL file."""
    reference_file = files["good" if source == "good" else "shards_jsonl"]
    memory = ConversationBatches(codec_for(model), read_conversations(reference_file),
                                 batch_size=1, length_group=1)
    expected = _by_conversation(list(memory(0)))
    streamed, loader = _batches(qwen_dir, model, files[source], "data.batch_size=1")
    got = _by_conversation(streamed)
    assert len(got) == len(expected) == (8 if source == "good" else 4)
    assert got.keys() == expected.keys()
    for row in expected:
        _assert_same(got[row], expected[row])
    assert "image_grid_thw" in streamed[0] or "image_grid_thw" in streamed[1]
    assert loader.skips.total_skipped == 0
    # The order is drawn from (seed, epoch): the same again, another in the next epoch.
    assert [_rows(b) for b in _batches(qwen_dir, model, files[source], "data.batch_size=1")[0]] \
        == [_rows(b) for b in streamed]
    other = _batches(qwen_dir, model, files[source], "data.batch_size=1", epoch=1)[0]
    assert [_rows(b) for b in other] != [_rows(b) for b in streamed]


def test_two_ranks_split_the_global_batches_and_cover_each_conversation_once(files, qwen_dir,
                                                                            model):
    options = ["data.batch_size=4", "data.options.streams=2", "data.options.rows_per_unit=2"]
    single, _ = _batches(qwen_dir, model, files["good"], *options)
    ranks = [_batches(qwen_dir, model, files["good"], *options, rank=r, world=2)[0]
             for r in range(2)]
    assert len(single) == 2 and [len(r) for r in ranks] == [2, 2]
    codec = codec_for(model)
    rows = {}
    for conversation in read_conversations(files["good"]):
        example, images = conversation_example(codec, conversation)
        rows[tuple(example.input_ids)] = (example, images)
    seen = []
    for whole, first, second in zip(single, *ranks, strict=True):
        assert _rows(whole) == _rows(first) + _rows(second)
        for part in (first, second):  # each rank's batch: the codec's collate of its 2 rows
            assert part["input_ids"].shape[0] == 2
            _assert_same(part, collate(codec, [rows[r] for r in _rows(part)]))
            seen += _rows(part)
    assert sorted(seen) == sorted(rows)  # every conversation once


def test_skip_batches_resumes_exactly(files, qwen_dir, model):
    for options in (["data.batch_size=2"],
                    ["data.batch_size=2", "data.options.length_group=2",
                     "data.options.rows_per_unit=3", "data.options.shuffle_buffer=3"]):
        full, _ = _batches(qwen_dir, model, files["good"], *options)
        assert len(full) == 4
        for skip in (1, 3):
            resumed, _ = _batches(qwen_dir, model, files["good"], *options, skip=skip)
            assert len(resumed) == len(full) - skip
            for a, b in zip(resumed, full[skip:], strict=True):
                _assert_same(a, b)


def test_length_groups_sort_each_group_and_keep_the_conversations(files, qwen_dir, model):
    plain, _ = _batches(qwen_dir, model, files["good"], "data.batch_size=2")
    grouped, _ = _batches(qwen_dir, model, files["good"], "data.batch_size=2",
                          "data.options.length_group=4")
    assert sorted(r for b in grouped for r in _rows(b)) == sorted(r for b in plain
                                                                 for r in _rows(b))
    # One stream, one group of 4 batches: the batches are the conversations sorted by length
    # and cut in twos, handed out in a drawn order.
    lengths = sorted((len(r) for b in grouped for r in _rows(b)), reverse=True)
    pairs = [sorted((len(r) for r in _rows(b)), reverse=True) for b in grouped]
    assert sorted(pairs, reverse=True) == [lengths[i:i + 2] for i in range(0, 8, 2)]

    def padding(batches: list[dict]) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(grouped) < padding(plain)


def test_bad_conversations_are_skipped_and_counted(files, qwen_dir, model, capsys):
    paths = f"data.options.paths=['{files['bad']}']"
    batches, loader = _batches(qwen_dir, model, files["good"], "data.batch_size=1", paths)
    assert len(batches) == 8  # the good ones, each once
    assert len(_by_conversation(batches)) == 8
    assert dict(loader.skips.skipped) == {"missing image": 1, "corrupt image": 1,
                                          "too long": 1, "bad json": 1, "bad conversation": 1}
    assert loader.skips.seen == 13
    report = capsys.readouterr().out
    assert "skipped 5 of 13" in report and "nowhere.png" in report


def test_held_out_batches_read_the_test_shards_in_order(files, qwen_dir, model, tmp_path):
    with ShardWriter(tmp_path, prefix="train", max_samples=4) as writer:
        for index in range(4):
            writer.write(Record(key=f"t{index}", image=_png("red"), conversation=[
                Turn("user", "<image>\nWhat?"), Turn("assistant", f"Train {index}.")]))
    with ShardWriter(tmp_path, prefix="test", max_samples=2) as writer:
        for index in range(4):
            writer.write(Record(key=f"e{index}", image=_png("wide"), conversation=[
                Turn("user", "<image>\nWhat?"), Turn("assistant", "Held out " * (index + 1))]))
    config = _config(qwen_dir, tmp_path, f"eval.data={tmp_path}", "eval.every=5",
                     "data.batch_size=1", f"data.options.paths=['{files['good']}']")
    held_out = eval_data_config(config)
    assert held_out.data.options["held_out"] is True
    batches = list(conversation_stream_source(held_out, model, DistInfo())(0))
    tokenizer = codec_for(model).processor.tokenizer
    replies = [tokenizer.decode(b["input_ids"][0][b["labels"][0] != IGNORE_INDEX].tolist())
               for b in batches]
    # The test shards alone (not the training shards, not options.paths), in file order.
    assert [r.count("Held out") for r in replies] == [1, 2, 3, 4]


def test_bad_options_are_refused(files, qwen_dir, model, tmp_path):
    for override, message in (("data.options.langs=[en]", "unknown data.options"),
                              ("data.options.streams=3", "divisible by streams = 3"),
                              ("data.options.length_group=0", "length_group"),
                              ("data.options.resampled=true", "samples_per_epoch"),
                              ("data.options.paths=7", "data.options.paths")):
        with pytest.raises(ConfigError, match=message):
            conversation_stream_source(_config(qwen_dir, files["good"], "data.batch_size=2",
                                               override), model, DistInfo())
    with pytest.raises(ConfigError, match="data.path: no such file"):
        conversation_stream_source(_config(qwen_dir, tmp_path / "none.jsonl"), model,
                                   DistInfo())
    broken = tmp_path / "broken.json"  # a JSON list is read whole: refused before any work
    broken.write_text('[{"messages": []}]', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.json:1: 'messages' must be"):
        conversation_stream_source(_config(qwen_dir, broken), model, DistInfo())


def test_a_short_run_learns(files, qwen_dir, tmp_path):
    folder = run(_config(qwen_dir, files["good"], "data.batch_size=4", "train.steps=24",
                         "optim.lr=1e-2", "optim.warmup_steps=2", "optim.weight_decay=0",
                         "stage.preset=full", "run.log_every=1", f"run.output_dir={tmp_path}",
                         "data.options.length_group=2"))
    losses = [r["loss"] for r in read_metrics(folder / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 24
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert last < 0.6 * first, (first, last)
