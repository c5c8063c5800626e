"""Continuous batching of chat replies (models/batched_decode.py, serve/continuous.py): requests
decoded together give exactly the tokens, text pieces and counts of each request answered alone
(greedy, seeded sampling, repetition penalty, stop strings; language model and VLM), through the
decoder, the scheduler and the HTTP app (streaming and not); requests join mid-decode; a client
that leaves frees its slot for the next request; a full queue is 429; a long wait 504."""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import imagefm
from imagefm.apps.vlm_chat import GenerationOptions, Reply, build_prompt
from imagefm.models import fused_decode
from imagefm.models.batched_decode import BatchDecoder, decode_step
from imagefm.models.decoder import DecoderLM
from imagefm.models.decoder_config import decoder_preset
from imagefm.models.generation import generate_tokens
from imagefm.models.quantized import kernel_status, quantize_decoder
from imagefm.serve import ServeSettings, create_app
from imagefm.serve.batching import QueueFullError
from imagefm.serve.continuous import ContinuousBatcher

httpx = pytest.importorskip("httpx")

TEXTS = ["the dog?", "a small cat", "작은 고양이", "the dog runs " * 5, "hi",
         "cat cat cat cat", "the dog runs the dog runs a small cat 작은", "a"]
MAX_TOKENS = [5, 40, 12, 30, 25, 8, 33, 18]


def _options(i: int, **extra) -> GenerationOptions:
    """Greedy, seeded sampling and a repetition penalty among the requests."""
    kind = [{}, {"temperature": 0.9, "top_k": 40, "seed": i}, {"repetition_penalty": 1.3},
            {"temperature": 0.7, "top_p": 0.9, "seed": 100 + i}][i % 4]
    return GenerationOptions(max_new_tokens=MAX_TOKENS[i], **(kind | extra))


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": TEXTS[i]}]


def _alone(model, i: int, **extra) -> tuple[list[str], Reply]:
    reply = Reply(model, build_prompt(model, _messages(i)), _options(i, **extra))
    return list(reply), reply


class Collector:
    """A sink of the scheduler: the pieces of one reply, and when it began and ended."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.pieces: list[str] = []
        self.began, self.done = threading.Event(), threading.Event()
        self.error: Exception | None = None
        self.ended_at = 0.0

    def begin(self) -> None:
        self.began.set()

    def emit(self, piece: str) -> None:
        self.pieces.append(piece)

    def end(self, error: Exception | None = None) -> None:
        self.error, self.ended_at = error, time.monotonic()
        self.done.set()


def _submit(batcher: ContinuousBatcher, model, i: int, **extra) -> tuple[Collector, Reply]:
    sink = Collector()
    reply = Reply(model, build_prompt(model, _messages(i)), _options(i, **extra))
    batcher.submit(reply, sink)
    return sink, reply


def _same_as_alone(model, i: int, sink: Collector, reply: Reply, **extra) -> None:
    pieces, alone = _alone(model, i, **extra)
    assert sink.done.wait(30) and sink.error is None
    assert sink.pieces == pieces and reply.text == alone.text == "".join(pieces)
    assert (reply.finish_reason, reply.completion_tokens, reply.prompt_tokens) == \
        (alone.finish_reason, alone.completion_tokens, alone.prompt_tokens)


def _slow_steps(lm: DecoderLM, seconds: float) -> None:
    lm.blocks[0].register_forward_pre_hook(lambda *_: time.sleep(seconds))


@pytest.fixture
def tiny_lm(tiny_llama_dir: Path) -> DecoderLM:
    return imagefm.load(tiny_llama_dir).eval()


@pytest.fixture
def quantized_lm(tiny_lm: DecoderLM) -> DecoderLM:
    if not kernel_status()[0]:
        pytest.skip("the quantised kernel cannot be built here")
    return quantize_decoder(copy.deepcopy(tiny_lm), "q4_1")


# --- the decoder ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True])
def test_batch_decoder_gives_each_sequence_its_tokens_alone(tiny_lm, quantized_lm, quantized):
    lm = quantized_lm if quantized else tiny_lm
    prompts = [torch.randint(3, lm.config.vocab_size, (1, n)) for n in (3, 7, 12, 5, 20, 9, 15, 4)]
    options = [{}, {"do_sample": True, "temperature": 0.8, "top_k": 50},
               {"repetition_penalty": 1.3}, {"do_sample": True, "top_p": 0.8}] * 2

    def generator(i: int) -> dict:
        return {"generator": torch.Generator().manual_seed(i)} if i % 2 else {}

    expected = [[int(t) for t in generate_tokens(lm, p, max_new_tokens=m, eos_token_id=[],
                                                 **options[i], **generator(i))]
                for i, (p, m) in enumerate(zip(prompts, MAX_TOKENS, strict=True))]
    decoder = BatchDecoder(lm)
    got: dict[int, list[int]] = {i: [] for i in range(8)}
    step = 0
    while step < 200 and (step < 16 or decoder.rows):
        if step % 2 == 0 and step // 2 < 8:  # a new sequence joins every other step
            i = step // 2
            decoder.add(prompts[i], max_new_tokens=MAX_TOKENS[i], tag=i, eos_token_id=[],
                        **options[i], **generator(i))
        for row, token in decoder.step():
            got[row.tag].append(token)
        step += 1
    assert [got[i] for i in range(8)] == expected
    assert decoder.decoded / decoder.steps > 3  # most steps decoded several sequences


def test_m_rope_rows_continue_their_own_positions():
    """Qwen-VL prompts (M-RoPE positions [3, 1, L] from image grids, and the rope delta that
    continues them) decode among plain rows as they do alone; embeddings stand in for images."""
    config = decoder_preset("lm-tiny", mrope_section=(2, 3, 3), qkv_bias=True)
    lm = DecoderLM(config).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompts = []
    for i, n in enumerate((9, 6, 12, 7)):
        ids = torch.randint(3, config.vocab_size, (1, n))
        extra = {}
        if i % 2 == 0:  # a 2x2 "image" at positions 2..5: three rows, one shared for text
            text = torch.arange(n)
            rows = torch.stack([text, text, text]).clone()
            rows[:, 2:6] = torch.tensor([[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]])
            rows[:, 6:] -= 2
            extra = {"inputs_embeds": lm.embed_tokens(ids).detach() * 1.5,
                     "position_ids": rows[:, None], "rope_deltas": torch.tensor([-2])}
        prompts.append((ids, extra))
    expected = [[int(t) for t in generate_tokens(lm, ids, max_new_tokens=12, eos_token_id=[],
                                                 **extra)] for ids, extra in prompts]
    decoder = BatchDecoder(lm)
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for i, (ids, extra) in enumerate(prompts):
        decoder.add(ids, max_new_tokens=12, tag=i, eos_token_id=[], **extra)
        for row, token in decoder.step():
            got[row.tag].append(token)
    while decoder.rows:
        for row, token in decoder.step():
            got[row.tag].append(token)
    assert [got[i] for i in range(4)] == expected


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_quantized_rows_are_bit_for_bit_those_alone(quantized_lm, threads, fused, monkeypatch):
    """With the quantised kernel each row's logits in a batched step are exactly its logits
    decoded alone (a single-row step with its own cache: the fused C step that
    generate_tokens runs, or without it a single-row forward), at 1 to 12 rows."""
    torch.set_num_threads(threads)  # (restored by conftest)
    monkeypatch.setattr(fused_decode, "ENABLED", fused)
    lm = quantized_lm
    prompts = [torch.randint(3, lm.config.vocab_size, (1, 4 + 3 * i)) for i in range(12)]
    caches, tokens, alone = [], [], []
    with torch.inference_mode():
        for prompt in prompts:
            cache = lm.new_cache(1, prompt.shape[1] + 2)
            first = lm(prompt, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
            single = copy.deepcopy(cache)
            alone.append(decode_step(lm, first, [single]) if fused else
                         lm(first[:, None], cache=single, logits_to_keep=1).logits[:, -1])
            caches.append(cache)
            tokens.append(first)
        batched = decode_step(lm, torch.cat(tokens), caches)
    assert torch.equal(batched, torch.cat(alone))
    assert [c.length for c in caches] == [p.shape[1] + 1 for p in prompts]


# --- the scheduler ----------------------------------------------------------------------------

def test_scheduler_answers_concurrent_requests_as_alone(tiny_lm):
    batcher = ContinuousBatcher(tiny_lm, slots=8, max_queue=8)
    try:
        submitted = [_submit(batcher, tiny_lm, i) for i in range(8)]
        for i, (sink, reply) in enumerate(submitted):
            _same_as_alone(tiny_lm, i, sink, reply)
        # A stop string cuts where it first appears, as alone.
        stop = "".join(_alone(tiny_lm, 1)[0])[6:8]
        sink, reply = _submit(batcher, tiny_lm, 1, stop=(stop,))
        _same_as_alone(tiny_lm, 1, sink, reply, stop=(stop,))
        assert reply.finish_reason == "stop"
        assert batcher.stats()["largest"] >= 4 and batcher.admitted == 0
    finally:
        batcher.close()


def test_requests_join_while_others_decode(tiny_lm):
    _slow_steps(tiny_lm, 0.002)
    batcher = ContinuousBatcher(tiny_lm, slots=8, max_queue=8)
    try:
        early = [_submit(batcher, tiny_lm, i) for i in (1, 3, 6)]
        deadline = time.monotonic() + 20
        while not all(len(sink.pieces) >= 2 for sink, _ in early):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert not any(sink.done.is_set() for sink, _ in early)  # still decoding...
        late = [(i, *_submit(batcher, tiny_lm, i)) for i in (0, 2, 4, 5, 7)]
        for i, (sink, reply) in zip((1, 3, 6), early, strict=True):
            _same_as_alone(tiny_lm, i, sink, reply)
        for i, sink, reply in late:
            _same_as_alone(tiny_lm, i, sink, reply)
        assert batcher.stats()["largest"] >= 4  # ...when the late ones joined the batch
    finally:
        batcher.close()


def test_a_cancelled_request_frees_its_slot_for_the_next(tiny_lm):
    _slow_steps(tiny_lm, 0.002)
    batcher = ContinuousBatcher(tiny_lm, slots=2, max_queue=3)
    try:
        (leaving, left_reply), (staying, stay_reply) = (_submit(batcher, tiny_lm, 1),
                                                        _submit(batcher, tiny_lm, 6))
        waiting, wait_reply = _submit(batcher, tiny_lm, 3)
        with pytest.raises(QueueFullError):
            _submit(batcher, tiny_lm, 0)
        assert leaving.began.wait(10) and staying.began.wait(10)
        while len(leaving.pieces) < 3:
            time.sleep(0.002)
        assert not waiting.began.is_set()  # no slot yet
        leaving.cancel.set()
        assert waiting.began.wait(10) and leaving.done.wait(10)
        assert not staying.done.is_set()  # the slot came from the request that left
        assert left_reply.finish_reason == "cancelled"
        assert left_reply.completion_tokens < MAX_TOKENS[1]
        _same_as_alone(tiny_lm, 3, waiting, wait_reply)
        _same_as_alone(tiny_lm, 6, staying, stay_reply)
    finally:
        batcher.close()


# --- the HTTP app -----------------------------------------------------------------------------

def _events(text: str) -> tuple[list[str], str | None, dict | None]:
    """The content pieces, finish reason and usage of a server-sent event stream."""
    pieces, finish, usage = [], None, None
    lines = [line for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            finish = choice["finish_reason"] or finish
            if choice["delta"].get("content"):
                pieces.append(choice["delta"]["content"])
    return pieces, finish, usage


def _body(i: int, stream: bool, **extra) -> dict:
    options = _options(i)
    body = {"messages": _messages(i), "max_tokens": options.max_new_tokens,
            "temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k,
            "repetition_penalty": options.repetition_penalty, "seed": options.seed,
            "stream": stream, **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _ask_all(app, bodies: list[dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/v1/chat/completions", json=body,
                                                  timeout=60) for body in bodies))


def _check_reply(response: httpx.Response, stream: bool, pieces: list[str], alone: Reply
                 ) -> None:
    assert response.status_code == 200, response.text
    usage = {"prompt_tokens": alone.prompt_tokens, "completion_tokens": alone.completion_tokens,
             "total_tokens": alone.prompt_tokens + alone.completion_tokens}
    if stream:
        assert _events(response.text) == (pieces, alone.finish_reason, usage)
    else:
        reply = response.json()
        assert reply["choices"][0]["message"]["content"] == "".join(pieces)
        assert reply["choices"][0]["finish_reason"] == alone.finish_reason
        assert reply["usage"] == usage


def test_app_batches_streaming_and_plain_requests_as_alone(tiny_lm):
    app = create_app(tiny_lm, settings=ServeSettings(model_name="tiny", chat_slots=8))
    streams = [i % 2 == 0 for i in range(8)]
    responses = asyncio.run(_ask_all(app, [_body(i, s) for i, s in enumerate(streams)]))
    for i, (response, stream) in enumerate(zip(responses, streams, strict=True)):
        _check_reply(response, stream, *_alone(tiny_lm, i))
    batching = app.state.engine.health()["batching"]
    assert batching["largest"] >= 4 and batching["slots"] == 8


def test_app_batches_vlm_requests_with_images(tiny_vlm):
    import base64
    import io

    import numpy as np
    from PIL import Image

    def png(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue()

    images = [png(seed) for seed in range(4)]
    bodies, expected = [], []
    for i, image in enumerate(images):
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        body = _body(i, stream=i % 2 == 1)
        body["messages"] = [{"role": "user", "content": [
            {"type": "text", "text": TEXTS[i]}, {"type": "image_url", "image_url": {"url": url}}]}]
        bodies.append(body)
        prompt = build_prompt(tiny_vlm, [{"role": "user", "content": f"<image>\n{TEXTS[i]}"}],
                              [image])
        reply = Reply(tiny_vlm, prompt, _options(i))
        expected.append((list(reply), reply))
    app = create_app(tiny_vlm, settings=ServeSettings(model_name="tiny-vlm", chat_slots=4))
    responses = asyncio.run(_ask_all(app, bodies))
    for i, response in enumerate(responses):
        _check_reply(response, i % 2 == 1, *expected[i])
    assert app.state.engine.health()["batching"]["largest"] >= 2


@pytest.mark.parametrize("slots", [2, 1])  # 1: one reply at a time, without the batcher
def test_full_queue_is_429_and_a_long_wait_504(tiny_lm, slots):
    gate = threading.Event()

    def hold(*_) -> None:  # the model waits for the gate (a pre-hook returning a value would
        gate.wait(20)  # replace the block's inputs)

    tiny_lm.blocks[0].register_forward_pre_hook(hold)
    settings = ServeSettings(model_name="tiny", chat_slots=slots, max_chat_queue=3,
                             timeout_s=0.5)
    app = create_app(tiny_lm, settings=settings)

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            def ask(i: int):
                return client.post("/v1/chat/completions", json=_body(i, False), timeout=60)

            first = asyncio.ensure_future(ask(1))  # holds the model (the gate) in its prefill
            while app.state.engine.health()["active"] < 1:
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(ask(i)) for i in (2, 3)]
            while app.state.engine.health()["active"] < 3:
                await asyncio.sleep(0.01)
            busy = await ask(4)  # three admitted: the queue is full
            late = await asyncio.gather(*waiting)  # no turn within timeout_s
            gate.set()
            return [busy, *late, await first]

    busy, *late, first = asyncio.run(scenario())
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == 429 and "busy" in busy.json()["error"]["message"]
    assert [r.status_code for r in late] == [504, 504]
    assert "timed out" in late[0].json()["error"]["message"]
    _check_reply(first, False, *_alone(tiny_lm, 1))
    deadline = time.monotonic() + 10
    while app.state.engine.health()["active"]:  # the ones that gave up leave the queue
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_client_leaving_mid_stream_frees_its_slot(tiny_lm):
    from test_search_fixtures import serve_in_thread

    pytest.importorskip("uvicorn")
    _slow_steps(tiny_lm, 0.01)
    settings = ServeSettings(model_name="tiny", chat_slots=2)
    app = create_app(tiny_lm, settings=settings)
    with serve_in_thread(app) as base, ThreadPoolExecutor(2) as pool:
        url = f"{base}/v1/chat/completions"
        staying = pool.submit(httpx.post, url, json=_body(1, False), timeout=60)
        with httpx.stream("POST", url, json=_body(6, True), timeout=60) as leaving:
            lines = leaving.iter_lines()
            assert next(lines).startswith("data: {")
            while app.state.engine.health()["active"] < 2:
                time.sleep(0.01)
            waiting = pool.submit(httpx.post, url, json=_body(5, False), timeout=60)
            while app.state.engine.health()["batching"]["waiting"] < 1:
                time.sleep(0.01)
        # The stream closed after its first event: the waiting request (8 tokens) takes its
        # slot while the other one (40) still decodes, and answers what it answers alone.
        _check_reply(waiting.result(), False, *_alone(tiny_lm, 5))
        assert not staying.done()
        _check_reply(staying.result(), False, *_alone(tiny_lm, 1))
        health = app.state.engine.health()
        assert health["active"] == 0
        assert health["completion_tokens"] < sum(MAX_TOKENS[i] for i in (1, 5, 6))
