"""``POST /v1/chat/completions`` on a real uvicorn server (loopback): the official ``openai``
client, streaming and not, with an image as a data URL; bad input as OpenAI-style 4xx errors;
generation off the event loop (health answers mid-reply, a full queue is 429, a long wait 504,
a client that leaves mid-stream stops its generation)."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_search_fixtures import serve_in_thread  # noqa: E402

from imagefm.apps.vlm_chat import GenerationOptions, Reply, build_prompt, stream_reply  # noqa: E402
from imagefm.models.vlm import VLM  # noqa: E402
from imagefm.serve import ServeSettings, create_app  # noqa: E402

N = 10
QUESTION = "What is in this picture?"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_message(*images: bytes, text: str = QUESTION) -> dict:
    parts = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_url(b)}} for b in images]
    return {"role": "user", "content": parts}


def test_openai_client_streaming_equals_non_streaming(tiny_vlm: VLM) -> None:
    image = png(0)
    messages = [image_message(image)]
    # What the Python API answers to the same conversation (the image before the text).
    reference = stream_reply(tiny_vlm, [{"role": "user", "content": f"<image>\n{QUESTION}"}],
                             [image], max_new_tokens=N)
    expected = "".join(reference)
    assert expected
    app = create_app(tiny_vlm, settings=ServeSettings(model_name="tiny-vlm", api_key="sesame"))
    with serve_in_thread(app) as base:
        refused = httpx.post(f"{base}/v1/chat/completions", json={"messages": messages})
        assert refused.status_code == 401  # the API key guards chat as the other routes
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        [card] = client.models.list().data
        assert card.id == "tiny-vlm" and card.model_type == "vlm" and card.image_size == 32
        done = client.chat.completions.create(model="tiny-vlm", messages=messages,
                                              max_tokens=N, temperature=0)
        choice = done.choices[0]
        assert done.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.message.content == expected
        assert choice.finish_reason == reference.finish_reason
        assert done.usage.prompt_tokens == reference.prompt_tokens
        assert done.usage.completion_tokens == reference.completion_tokens
        assert done.usage.total_tokens == reference.prompt_tokens + reference.completion_tokens

        stream = client.chat.completions.create(model="tiny-vlm", messages=messages,
                                                max_completion_tokens=N, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [c.choices[0].delta.content for c in chunks if c.choices]
        assert "".join(p for p in pieces if p) == expected
        assert len([p for p in pieces if p]) > 1  # streamed in pieces, not one block
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] \
            == choice.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == done.usage

        # A stop string cuts the answer where it first appears (and is not returned).
        stop = expected[4:6]
        cut = client.chat.completions.create(model="tiny-vlm", messages=messages, max_tokens=N,
                                             temperature=0, stop=[stop])
        assert cut.choices[0].message.content == expected[:expected.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        # Sampling with a seed repeats; OpenAI's default temperature (1) samples.
        sampled = [client.chat.completions.create(model="tiny-vlm", messages=messages,
                                                  max_tokens=N, seed=seed).choices[0]
                   .message.content for seed in (3, 3, 4, 5)]
        assert sampled[0] == sampled[1] and len(set(sampled)) > 1
        with pytest.raises(openai.BadRequestError, match="data URL"):
            client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(png(0))

    def log_message(self, *args) -> None:
        pass


def test_bad_requests_are_4xx_in_the_error_format(tiny_vlm: VLM) -> None:
    settings = ServeSettings(model_name="tiny-vlm", max_chat_images=2, max_new_tokens=64,
                             max_prompt_chars=5000)
    image = data_url(png(0))
    corrupt = data_url(b"\x89PNG\r\n\x1a\n not a real picture")
    long_text = "the dog runs " * 200  # fits the character limit, not the 256-token context
    cases = [
        ({"messages": [image_message(text="x") | {"content": [
            {"type": "image_url", "image_url": {"url": corrupt}}]}]}, 400, "cannot decode"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
         400, "base64"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
         400, "data URL"),
        ({"messages": [image_message(png(0), png(1), png(2))]}, 413, "3 images"),
        ({"messages": [{"role": "user", "content": long_text}]}, 400, "context"),
        ({"messages": [{"role": "user", "content": "x" * 6000}]}, 413, "characters"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "limit"),
        ({"messages": [{"role": "user", "content": "the dog " * 60}], "max_tokens": 60},
         400, "context"),
        ({"messages": [{"role": "user", "content": "<image> hi"}]}, 400, "image_url parts"),
        ({"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": image}}]}]}, 400, "user messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         400, "input_audio"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "one choice"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "not found"),
        ({"messages": []}, 422, "messages"),
        ({"model": "tiny-vlm"}, 422, "messages"),
        ({"messages": [{"content": "hi"}]}, 422, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 422,
         "temperature"),
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    cases.append(({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": remote}}]}]}, 400, "fetches no URLs"))
    try:
        with serve_in_thread(create_app(tiny_vlm, settings=settings)) as base:
            for body, status, words in cases:
                response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
                assert response.status_code == status, (body, response.text)
                error = response.json()["error"]
                assert error["code"] == status and words in error["message"], (body, error)
                assert set(error) == {"message", "type", "code"}
            assert _Recorder.hits == []  # the server never fetched the remote image
            # The dual-encoder routes are not there for a VLM; the page is not either.
            assert httpx.post(f"{base}/v1/embeddings", json={"input": "x"}).status_code == 404
            # And the server still answers good requests.
            ok = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
                "messages": [image_message(png(0))], "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3
    finally:
        server.shutdown()


class Gate:
    """A forward hook that holds the LM at its first step until ``open`` (one request's
    generation stays in progress for as long as a test needs)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        lm.register_forward_pre_hook(self)

    def __call__(self, *_) -> None:
        self.entered.set()
        assert self.opened.wait(20)


def test_generation_runs_off_the_event_loop_with_queue_limits(tiny_vlm: VLM) -> None:
    gate = Gate(tiny_vlm.lm)
    settings = ServeSettings(model_name="tiny-vlm", max_chat_queue=2, timeout_s=0.5)
    body = {"messages": [image_message(png(0))], "max_tokens": 4}
    with serve_in_thread(create_app(tiny_vlm, settings=settings)) as base, \
            ThreadPoolExecutor(2) as pool:
        url = f"{base}/v1/chat/completions"
        first = pool.submit(httpx.post, url, json=body, timeout=30)
        assert gate.entered.wait(20)
        started = time.monotonic()
        health = httpx.get(f"{base}/healthz", timeout=5).json()
        assert time.monotonic() - started < 2 and health["generation"]["active"] == 1
        second = pool.submit(httpx.post, url, json=body, timeout=30)  # waits for its turn...
        time.sleep(0.1)
        busy = httpx.post(url, json=body, timeout=30)  # ...so a third finds the queue full
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        late = second.result()
        assert late.status_code == 504 and "timed out" in late.json()["error"]["message"]
        gate.opened.set()
        assert first.result().status_code == 200


def test_a_client_leaving_mid_stream_stops_its_generation(tiny_vlm: VLM) -> None:
    messages = [{"role": "user", "content": "the dog?"}]
    full = Reply(tiny_vlm, build_prompt(tiny_vlm, messages), GenerationOptions(max_new_tokens=200))
    "".join(full)
    assert full.completion_tokens >= 100  # this prompt runs long when nobody stops it
    # Every step slowed (a block runs in each step, batched or not).
    tiny_vlm.lm.blocks[0].register_forward_pre_hook(lambda *_: time.sleep(0.01))
    with serve_in_thread(create_app(tiny_vlm, settings=ServeSettings())) as base:
        body = {"messages": messages, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream")
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
        deadline = time.monotonic() + 5
        while (health := httpx.get(f"{base}/healthz").json()["generation"])["active"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health["completion_tokens"] < full.completion_tokens
