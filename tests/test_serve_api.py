"""Every endpoint through an HTTP client (ASGI TestClient): answers, bad input, limits, security."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("faiss")

from fastapi.testclient import TestClient  # noqa: E402
from test_search_fixtures import (  # noqa: E402
    NAMES,
    ColourModel,
    colour_vector,
    image_bytes,
    make_colour_folder,
)

from imagefm.apps.search import Index  # noqa: E402
from imagefm.serve import ServeSettings, create_app  # noqa: E402


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Index, dict[str, str], Path]:
    root = tmp_path / "photos"
    paths = make_colour_folder(root)
    index = Index.build(root, tmp_path / "idx", ColourModel(), workers=0)
    return index, paths, root


def client_for(index: Index | None, **settings) -> TestClient:
    model = index.model if index is not None else ColourModel()
    app = create_app(model, index=index, settings=ServeSettings(model_name="colours", **settings))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(indexed) -> TestClient:
    with client_for(indexed[0]) as c:
        yield c


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    for word in words:
        assert word in error["message"], error["message"]


# --- the endpoints --------------------------------------------------------------------------------

def test_healthz_and_models(client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["index"] == {"images": len(NAMES), "kind": "flat"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0] | {"created": 0} == {
        "id": "colours", "object": "model", "created": 0, "owned_by": "imagefm",
        "model_type": "clip", "embed_dim": 3, "image_size": 16}


def test_embeddings_texts_and_images_openai_shape(client) -> None:
    body = {"model": "colours", "input": ["red", "빨간색", data_url(image_bytes("blue")),
                                          {"image": b64(image_bytes("green"))}, {"text": "blue"}]}
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "list" and out["model"] == "colours"
    assert [d["index"] for d in out["data"]] == list(range(5))
    assert all(d["object"] == "embedding" for d in out["data"])
    vectors = np.array([d["embedding"] for d in out["data"]])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    red = colour_vector("red") / np.linalg.norm(colour_vector("red"))
    np.testing.assert_allclose(vectors[0], red, atol=1e-5)
    np.testing.assert_allclose(vectors[1], vectors[0], atol=1e-6)  # Korean = English here
    assert vectors[2] @ vectors[4] > 0.99  # a blue image is close to the word "blue"
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] == 3


def test_embeddings_base64_encoding_and_plain_base64_images(client) -> None:
    png = b64(image_bytes("yellow"))
    floats = client.post("/v1/embeddings", json={"input": [png], "input_type": "image"}).json()
    packed = client.post("/v1/embeddings", json={"input": png, "input_type": "image",
                                                 "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], rtol=1e-6)


def test_classify_in_english_and_korean(client) -> None:
    for labels, lang, want in ((["red", "green", "blue"], "en", "green"),
                               (["빨간색", "초록색", "파란색"], "ko", "초록색")):
        response = client.post("/v1/classify", json={"image": data_url(image_bytes("green")),
                                                     "labels": labels, "lang": lang})
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["labels"][0]["label"] == want and not out["multi_label"]
        assert sum(item["probability"] for item in out["labels"]) == pytest.approx(1.0, abs=1e-5)
        probabilities = [item["probability"] for item in out["labels"]]
        assert probabilities == sorted(probabilities, reverse=True)
    top = client.post("/v1/classify", json={"image": b64(image_bytes("red")), "top_k": 1,
                                            "labels": ["red", "blue"]}).json()
    assert [item["label"] for item in top["labels"]] == ["red"]


def test_search_by_text_and_image_then_fetch_the_files(client, indexed) -> None:
    _, paths, root = indexed
    out = client.post("/v1/search", json={"query": "빨간색 자동차", "k": 3}).json()
    assert out["query_type"] == "text" and len(out["results"]) == 3
    best = out["results"][0]
    assert best["path"] == paths["red"] and best["score"] > 0.99
    out = client.post("/v1/search", json={"image": data_url(image_bytes("purple")), "k": 1})
    assert out.json()["results"][0]["path"] == paths["purple"]

    thumb = client.get(best["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    original = client.get(best["image_url"])
    assert original.status_code == 200 and original.content == (root / paths["red"]).read_bytes()
    assert original.headers["content-type"] == "image/png"


def test_the_page_and_its_assets(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "Zero-shot" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]


# --- bad input ------------------------------------------------------------------------------------

def test_corrupt_and_wrongly_encoded_images_are_400(client) -> None:
    bad = [
        ({"input": data_url(b"\x89PNG\r\n\x1a\n but then garbage")}, "input[0]"),
        ({"input": "data:image/png;base64,@@@not base64@@@"}, "not valid base64"),
        ({"input": [{"image": "data:text/html;base64,PGI+aGk8L2I+"}]}, "not an image"),
        ({"input": [{"image": ""}]}, "empty"),
        ({"input": [{"text": "red", "image": b64(image_bytes("red"))}]}, "exactly one"),
        ({"input": ["ok", ""]}, "input[1]"),
    ]
    for body, words in bad:
        assert_error(client.post("/v1/embeddings", json=body), 400, words)
    truncated = image_bytes("red")[:40]
    assert_error(client.post("/v1/classify", json={"image": b64(truncated), "labels": ["a"]}),
                 400, "cannot decode")
    assert_error(client.post("/v1/search", json={"image": b64(b"GIF89a..."), "k": 2}), 400)


def test_missing_fields_and_wrong_types_are_422(client) -> None:
    cases = [
        ("/v1/embeddings", {}, "input"),
        ("/v1/embeddings", {"input": [1, 2, 3]}, "input"),  # token arrays are not supported
        ("/v1/classify", {"image": b64(image_bytes("red"))}, "labels"),
        ("/v1/classify", {"image": b64(image_bytes("red")), "labels": []}, "labels"),
        ("/v1/search", {"query": "red", "k": 0}, "k"),
        ("/v1/search", {"query": "red", "kk": 3}, "kk"),  # misspelt field
    ]
    for path, body, words in cases:
        assert_error(client.post(path, json=body), 422, words)
    assert_error(client.post("/v1/search", content=b"{not json",
                             headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/v1/search", json={"k": 3}), 400, "exactly one")
    assert_error(client.post("/v1/search", json={"query": "x", "image": "y"}), 400, "exactly one")


def test_unknown_model_language_and_other_refusals(client) -> None:
    assert_error(client.post("/v1/embeddings", json={"input": "red", "model": "gpt-4"}), 404,
                 "gpt-4", "colours")
    assert_error(client.post("/v1/classify", json={"image": b64(image_bytes("red")),
                                                   "labels": ["a", "b"], "lang": "xx"}),
                 400, "xx")
    assert_error(client.post("/v1/classify", json={"image": b64(image_bytes("red")),
                                                   "labels": ["a", "a"]}), 400, "distinct")
    assert_error(client.post("/v1/embeddings", json={"input": "red", "dimensions": 2}), 400,
                 "dimensions")
    assert_error(client.get("/v1/thumbnails/999999"), 404)
    assert_error(client.get("/v1/images/999999"), 404)
    assert_error(client.get("/v1/thumbnails/1?size=100000"), 422)
    assert_error(client.get("/no/such/route"), 404)


def test_size_limits_are_413(indexed) -> None:
    with client_for(indexed[0], max_request_bytes=50_000, max_inputs=4, max_text_chars=50,
                    max_image_pixels=10_000, max_labels=3) as client:
        big = {"input": "x" * 60_000}
        assert_error(client.post("/v1/embeddings", json=big), 413, "limit")

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(20):
                yield b" " * 5_000

        assert_error(client.post("/v1/embeddings", content=chunks(),
                                 headers={"content-type": "application/json"}), 413)
        assert_error(client.post("/v1/embeddings", json={"input": ["a"] * 5}), 413, "5 inputs")
        assert_error(client.post("/v1/embeddings", json={"input": "y" * 51}), 413, "51")
        assert_error(client.post("/v1/classify", json={"image": b64(image_bytes("red")),
                                                       "labels": list("abcd")}), 413, "labels")
        large = image_bytes("red", size=(200, 100))  # 20,000 pixels > 10,000
        assert_error(client.post("/v1/embeddings", json={"input": data_url(large)}), 413,
                     "pixels")
        assert_error(client.post("/v1/embeddings", json={"input": data_url(bomb_png())}), 413,
                     "decompression bomb")


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims 2.5 gigapixels: refused before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# --- files: only indexed ones, only by id --------------------------------------------------------

TRAVERSALS = [
    "/v1/thumbnails/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/v1/images/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/images/%252e%252e%252fetc%252fpasswd",
    "/v1/images/1%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/images/-1",
    "/v1/images/1.5",
    "/static/..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/%2e%2e%2fapp.py",
    "/static/..%5c..%5capp.py",
    "/static/app.py",
    "/static/__init__.py",
    "/v1/images/%2Fetc%2Fpasswd",
]


def test_path_traversal_attempts_are_4xx_and_leak_nothing(client) -> None:
    for url in TRAVERSALS:
        response = client.get(url)
        assert 400 <= response.status_code < 500, (url, response.status_code)
        assert b"root:" not in response.content and b"import" not in response.content, url


def test_a_file_swapped_for_a_link_after_indexing_is_not_served(client, indexed) -> None:
    _, paths, root = indexed
    hit = client.post("/v1/search", json={"query": "red", "k": 1}).json()["results"][0]
    (root / paths["red"]).unlink()
    (root / paths["red"]).symlink_to("/etc/passwd")
    assert_error(client.get(hit["image_url"]), 404)
    assert_error(client.get(f"{hit['thumbnail_url']}?size=64"), 404)


def test_api_key_guards_v1_but_not_health_or_page(indexed) -> None:
    with client_for(indexed[0], api_key="s3cret") as client:
        assert_error(client.get("/v1/models"), 401, "API key")
        assert client.get("/v1/models").headers["www-authenticate"] == "Bearer"
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).is_success
        assert client.get("/v1/thumbnails/1", headers={"X-API-Key": "s3cret"}).is_success
        assert_error(client.get("/v1/thumbnails/1"), 401)
        assert client.get("/healthz").json()["auth"] is True
        assert client.get("/").is_success


def test_without_an_index_search_is_404_and_the_rest_works() -> None:
    with client_for(None) as client:
        assert client.get("/healthz").json()["index"] is None
        assert_error(client.post("/v1/search", json={"query": "red"}), 404, "no index")
        assert_error(client.get("/v1/images/1"), 404)
        out = client.post("/v1/embeddings", json={"input": "blue"})
        assert out.status_code == 200


def test_server_errors_do_not_leak_internals(indexed) -> None:
    model = ColourModel()

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail /home/user/model.bin")

    model.encode_text = broken
    app = create_app(model, settings=ServeSettings())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/embeddings", json={"input": "red"})
        assert response.status_code == 500
        assert "secret" not in response.text and response.json()["error"]["code"] == 500
