"""The server on a real socket (uvicorn on 127.0.0.1): raw traversal paths, concurrency and
dynamic batching, timeouts and a full queue."""

from __future__ import annotations

import base64
import http.client
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("faiss")

import httpx  # noqa: E402
from test_search_fixtures import (  # noqa: E402
    NAMES,
    ColourModel,
    colour_vector,
    image_bytes,
    make_colour_folder,
    serve_in_thread,
)

from imagefm.apps.search import Index  # noqa: E402
from imagefm.serve import ServeSettings, create_app  # noqa: E402


class SlowColourModel(ColourModel):
    """Each forward pass takes ``delay`` seconds whatever its batch size, as on an accelerator
    (or a CPU with idle cores): the situation dynamic batching is for."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def encode_image(self, pixel_values):
        time.sleep(self.delay)
        return super().encode_image(pixel_values)


def raw_get(base: str, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (no client-side normalisation of '..')."""
    url = urlparse(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_raw_traversal_paths_over_a_socket(tmp_path) -> None:
    root = tmp_path / "photos"
    make_colour_folder(root)
    (tmp_path / "secret.txt").write_text("root:x:0:0 top secret")
    index = Index.build(root, tmp_path / "idx", ColourModel(), workers=0)
    app = create_app(index.model, index=index, settings=ServeSettings())
    paths = [
        "/v1/images/../../etc/passwd",
        "/v1/thumbnails/../../../etc/passwd",
        "/static/../../../../etc/passwd",
        "/static/../app.py",
        "/static/..%2f..%2f..%2fsecret.txt",
        "/v1/images/..%2F..%2Fsecret.txt",
        "/v1/images/%2e%2e/%2e%2e/secret.txt",
        "/v1/thumbnails/..\\..\\secret.txt",
        "/../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//etc/passwd",
        "/v1/images/1/../../../../etc/passwd",
    ]
    with serve_in_thread(app) as base:
        for path in paths:
            status, body = raw_get(base, path)
            assert 400 <= status < 500, (path, status)
            assert b"root:" not in body and b"secret" not in body, path
        # Control: the same connection path serves a real indexed file by id.
        status, body = raw_get(base, "/v1/images/1")
        assert status == 200 and body in {(root / p).read_bytes() for p in
                                          [h.path for h in index.search("red", k=len(NAMES))]}


def _embed_concurrently(base: str, clients: int, per_client: int) -> list[np.ndarray]:
    images = [NAMES[i % len(NAMES)] for i in range(clients)]

    def worker(name: str) -> list[np.ndarray]:
        url = "data:image/png;base64," + base64.b64encode(image_bytes(name)).decode()
        out = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for _ in range(per_client):
                response = client.post("/v1/embeddings", json={"input": url})
                assert response.status_code == 200, response.text
                out.append(np.array(response.json()["data"][0]["embedding"]))
        return out

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(worker, images))
    for name, vectors in zip(images, results, strict=True):
        want = colour_vector(name) / np.linalg.norm(colour_vector(name))
        for vector in vectors:  # each client got its own image's embedding back
            assert vector @ want > 0.999
    return [v for vectors in results for v in vectors]


@pytest.mark.parametrize("max_batch", [16, 1])
def test_concurrent_clients_are_batched_only_when_enabled(max_batch: int) -> None:
    model = SlowColourModel(delay=0.03)
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=10)
    with serve_in_thread(create_app(model, settings=settings)) as base:
        _embed_concurrently(base, clients=16, per_client=3)
        stats = httpx.get(f"{base}/healthz").json()["batching"]["image"]
    assert stats["items"] == 48
    if max_batch == 1:
        assert stats["largest"] == 1 and stats["batches"] == 48
    else:
        assert stats["largest"] > 4 and stats["batches"] < 24
        assert max(model.image_calls) <= 16


def test_timeout_is_504_and_a_full_queue_is_429() -> None:
    model = SlowColourModel(delay=0.5)
    settings = ServeSettings(max_batch=1, max_queue=1, timeout_s=0.2)
    url = "data:image/png;base64," + base64.b64encode(image_bytes("red")).decode()

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{base}/v1/embeddings", json={"input": url}, timeout=10)

    with serve_in_thread(create_app(model, settings=settings)) as base:
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429, 504} and 504 in codes and 429 in codes, codes
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]["message"]
        late = next(r for r in responses if r.status_code == 504)
        assert "timed out" in late.json()["error"]["message"]
        time.sleep(0.6)  # the server recovers once the queue drains
        model.delay = 0.0
        assert post(0).status_code == 200


def test_the_official_openai_client_reads_our_embeddings() -> None:
    openai = pytest.importorskip("openai")
    model = ColourModel()
    with serve_in_thread(create_app(model, settings=ServeSettings(api_key="sesame"))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sesame", max_retries=0)
        texts = client.embeddings.create(model="colourmodel", input=["red", "빨간색"])
        url = "data:image/png;base64," + base64.b64encode(image_bytes("red")).decode()
        image = client.embeddings.create(model="colourmodel", input=url,
                                         extra_body={"input_type": "image"})
        packed = client.embeddings.create(model="colourmodel", input="red",
                                          encoding_format="base64")
    assert [d.index for d in texts.data] == [0, 1] and texts.usage.total_tokens > 0
    red, korean_red = (np.array(d.embedding) for d in texts.data)
    assert red @ korean_red > 0.99  # the fixture embeds colour words alike in both languages
    assert np.array(image.data[0].embedding) @ red > 0.99
    # asked for explicitly, base64 comes back as sent: little-endian float32, as OpenAI's
    unpacked = np.frombuffer(base64.b64decode(packed.data[0].embedding), dtype="<f4")
    assert np.allclose(unpacked, red, atol=1e-6)
