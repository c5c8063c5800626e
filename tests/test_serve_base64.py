"""Base64 images in requests, through the server's fast path (its speed is measured by
benchmarks/bench_search.py, not here). Base64 is decoded strictly first and stripped of
whitespace only when that fails; both ways must give the same bytes and the same errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_search_fixtures import ColourModel, image_bytes  # noqa: E402

from imagefm.serve import ServeSettings, create_app  # noqa: E402
from imagefm.serve.engine import BadInput, decode_base64_image  # noqa: E402


def wrapped(data: bytes, width: int = 76, newline: str = "\r\n") -> str:
    """Base64 broken into lines, as MIME and PEM encoders write it."""
    text = base64.b64encode(data).decode("ascii")
    return newline.join(text[i:i + width] for i in range(0, len(text), width))


def test_plain_and_line_wrapped_base64_give_the_same_bytes() -> None:
    data = image_bytes("red") * 3  # long enough to span several lines
    plain = base64.b64encode(data).decode("ascii")
    assert decode_base64_image(plain, "x") == data
    assert decode_base64_image(wrapped(data), "x") == data
    assert decode_base64_image(" " + wrapped(data, 10, "\n\t") + "\n", "x") == data
    # Unicode whitespace (a no-break space) was stripped before; it still is.
    assert decode_base64_image(plain[:8] + "\u00a0" + plain[8:], "x") == data
    assert decode_base64_image("data:image/png;base64," + wrapped(data), "x") == data


@pytest.mark.parametrize("bad", ["@@@not base64@@@", "abc", "ab\ncd\ne", "YWJj\n-_==",
                                 "data:image/png;base64, \n ", "ab\u00e9cd"])
def test_invalid_base64_is_refused_with_or_without_whitespace(bad: str) -> None:
    with pytest.raises(BadInput) as caught:
        decode_base64_image(bad, "input[3]")
    assert caught.value.status == 400
    assert str(caught.value).startswith("input[3]: ")
    assert "not valid base64" in str(caught.value) or "empty" in str(caught.value)


def test_wrapped_base64_image_embeds_like_the_plain_one() -> None:
    app = create_app(ColourModel(), settings=ServeSettings(model_name="colours"))
    png = image_bytes("green")
    with TestClient(app, raise_server_exceptions=False) as client:
        answers = [client.post("/v1/embeddings", json={"input": [{"image": text}]})
                   for text in (base64.b64encode(png).decode("ascii"), wrapped(png, 20))]
        bad = client.post("/v1/embeddings",
                          json={"input": [{"image": wrapped(png, 20)[:-7] + "\n!"}]})
    vectors = []
    for answer in answers:
        assert answer.status_code == 200, answer.text
        vectors.append(np.asarray(answer.json()["data"][0]["embedding"]))
    np.testing.assert_array_equal(vectors[0], vectors[1])
    assert np.linalg.norm(vectors[0]) == pytest.approx(1.0, abs=1e-5)
    assert bad.status_code == 400 and "input[0]" in bad.json()["error"]["message"]
