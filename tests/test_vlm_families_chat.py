"""Chat, ask, caption, the OpenAI-compatible server and vlm-eval with every VLM family.

One tiny random model per family, built by the family's own parity test (LLaVA-style: conftest's
``tiny_vlm``; Qwen2-VL, LLaVA-OneVision, SmolVLM: the transformers references of
test_qwen2_vl.py, test_llava_onevision.py, test_idefics3.py, saved in the Hugging Face layout and
loaded with ``imagefm.load``). The reference answer is always the model's own greedy
``generate`` on what the family's processor (``imagefm.load_processor``) makes of the same
messages, cut at the end of the turn; the commands and the server must give exactly that text.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen2VLImageProcessorPil"):
    pytest.skip("the references are built with transformers 5", allow_module_level=True)
pytest.importorskip("fastapi")

import conftest  # noqa: E402
import test_idefics3  # noqa: E402
import test_llava_onevision  # noqa: E402
import test_qwen2_vl  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import imagefm  # noqa: E402
from imagefm.apps.vlm_chat import ChatSession  # noqa: E402
from imagefm.chat import ChatTemplateError, chat_stops, with_image_parts  # noqa: E402
from imagefm.cli import app  # noqa: E402
from imagefm.serve import ServeSettings, create_app  # noqa: E402
from imagefm.train.vlm_data import DESCRIBE  # noqa: E402
from imagefm.vlm_runtime import chat_processor, decode_replies  # noqa: E402

N = 8  # new tokens per reply
QUESTION_KO = "이 사진에 무엇이 있나요?"
QUESTION_EN = "What is in the picture?"
FAMILIES = ["llava", "qwen2_vl", "llava_onevision", "smolvlm"]


@dataclass
class Family:
    name: str
    directory: Path
    model: Any
    processor: Any  # the family's own, read from the directory
    images: list[Path]

    def batch(self, turns: list[tuple[str, list[Path], str]]) -> dict[str, torch.Tensor]:
        """What the family's processor makes of a conversation of (role, images, text) turns,
        images before the text of their turn: LLaVA's ``<image>\\n`` text, content parts with
        the pictures in them for the others (as their references take them)."""
        if self.name == "llava":
            messages = [{"role": r, "content": "<image>\n" * len(i) + t} for r, i, t in turns]
            return self.processor.prompt([messages], [p for _, i, _ in turns for p in i])
        messages = [{"role": r, "content": [{"type": "image", "image": Image.open(p)} for p in i]
                     + [{"type": "text", "text": t}]} for r, i, t in turns]
        return self.processor.apply_chat_template(messages)

    def greedy(self, turns: list[tuple[str, list[Path], str]]) -> str:
        """The reference: ``model.generate`` on :meth:`batch`, cut at the end of the turn."""
        batch = self.batch(turns)
        eos, stops = chat_stops(self.model.lm)
        out = self.model.generate(**batch, max_new_tokens=N, eos_token_id=eos,
                                  stop_strings=stops)
        new = out[0, batch["input_ids"].shape[1]:].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        text = self.model.tokenizer.decode(new[:ends[0]] if ends else new)
        for stop in stops:
            text = text.split(stop)[0]
        return text


def _save_pictures(directory: Path) -> list[Path]:
    paths = []
    for seed, (height, width) in enumerate([(40, 52), (61, 33)]):
        rng = np.random.default_rng(seed)
        paths.append(directory / f"picture{seed}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _build(name: str, tmp_path_factory: pytest.TempPathFactory) -> Family:
    directory = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    if name == "llava":
        vlm = conftest.tiny_vlm.__wrapped__(conftest.tiny_llama_dir.__wrapped__(
            tmp_path_factory.mktemp("llama")))
        vlm.save_pretrained(directory)
    elif name == "qwen2_vl":
        directory = test_qwen2_vl.reference.__wrapped__(tmp_path_factory)[2]
    elif name == "llava_onevision":
        directory = test_llava_onevision.reference.__wrapped__(tmp_path_factory)[2]
    else:
        test_idefics3._build(directory, "smolvlm")
    model = imagefm.load(directory).eval()
    return Family(name, directory, model, imagefm.load_processor(directory),
                  _save_pictures(tmp_path_factory.mktemp("pictures")))


@pytest.fixture(scope="module")
def built() -> dict[str, Family]:
    return {}  # each family is built once per module, when a test first needs it


@pytest.fixture(params=FAMILIES)
def family(request, built, tmp_path_factory) -> Family:
    if request.param not in built:
        built[request.param] = _build(request.param, tmp_path_factory)
    return built[request.param]


def run(*args: Any, stdin: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


# --- the commands ---------------------------------------------------------------------------------

def test_ask_and_caption_commands_equal_greedy_generate(family: Family) -> None:
    one, two = family.images
    expected = family.greedy([("user", [one], QUESTION_KO)])
    assert expected  # a real reply, so the comparison means something
    result = run("ask", one, QUESTION_KO, "--model", family.directory, "-n", N)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"
    for lang in ("en", "ko"):
        result = run("caption", one, two, "--model", family.directory, "--lang", lang, "-n", N)
        assert result.exit_code == 0, result.output
        assert result.stdout.split("\n")[:-1] == [
            f"{path}\t{family.greedy([('user', [path], DESCRIBE[lang])])}" for path in (one, two)]


def test_chat_command_turns_with_images_equal_greedy_generate(family: Family) -> None:
    one, two = family.images
    first = family.greedy([("user", [one], QUESTION_EN)])
    second = family.greedy([("user", [one], QUESTION_EN), ("assistant", [], first),
                            ("user", [two], QUESTION_KO)])
    third = family.greedy([("user", [one], QUESTION_EN), ("assistant", [], first),
                           ("user", [two], QUESTION_KO), ("assistant", [], second),
                           ("user", [], "고양이?")])
    assert first and second
    script = f"{QUESTION_EN}\n/image {two}\n{QUESTION_KO}\n고양이?\n/quit\n"
    result = run("chat", "--model", family.directory, "--image", one, "-n", N, stdin=script)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{first}\n{second}\n{third}\n"


# --- the server -----------------------------------------------------------------------------------

def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _message(*urls: str, text: str = QUESTION_EN) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": url}} for url in urls]}


def _streamed(client: TestClient, body: dict) -> tuple[str, list[dict]]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def test_server_chat_completions_base64_and_streaming(family: Family) -> None:
    one, two = family.images
    expected = family.greedy([("user", [one], QUESTION_EN)])
    both = family.greedy([("user", [one, two], QUESTION_KO)])
    assert expected and both
    application = create_app(family.model, settings=ServeSettings(model_name=family.name))
    with TestClient(application) as client:
        [card] = client.get("/v1/models").json()["data"]
        assert card["model_type"] == {"llava": "vlm"}.get(family.name, family.name)
        body = {"model": family.name, "messages": [_message(_data_url(one))], "max_tokens": N,
                "temperature": 0}
        done = client.post("/v1/chat/completions", json=body)
        assert done.status_code == 200, done.text
        answer = done.json()
        assert answer["choices"][0]["message"]["content"] == expected
        assert answer["usage"]["prompt_tokens"] == family.batch(
            [("user", [one], QUESTION_EN)])["input_ids"].shape[1]
        text, chunks = _streamed(client, body)
        assert text == expected
        assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get(
            "content")]) > 1  # pieces, not one block
        assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
        # Several images in one message, after its text: they go before it.
        body["messages"] = [_message(_data_url(one), _data_url(two), text=QUESTION_KO)]
        assert client.post("/v1/chat/completions", json=body).json()[
            "choices"][0]["message"]["content"] == both
        assert _streamed(client, body)[0] == both


class _Pictures(http.server.BaseHTTPRequestHandler):
    """Serves one PNG at /cat.png and redirects /elsewhere.png to it."""

    png = b""

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        if self.path == "/elsewhere.png":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
            return
        self.send_response(200 if self.path == "/cat.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args: Any) -> None:
        pass


def test_image_urls_and_files_where_the_settings_allow(tiny_vlm, tmp_path: Path) -> None:
    folder = tmp_path / "pictures"
    folder.mkdir()
    [one, _] = _save_pictures(folder)
    (tmp_path / "secret.png").write_bytes(one.read_bytes())
    _Pictures.png = one.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Pictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    settings = ServeSettings(model_name="tiny", image_url_hosts=("127.0.0.1",),
                             image_dir=str(folder))

    def ask(client: TestClient, url: str) -> Any:
        return client.post("/v1/chat/completions", json={
            "messages": [_message(url)], "max_tokens": N, "temperature": 0})

    try:
        with TestClient(create_app(tiny_vlm, settings=settings)) as client:
            expected = ask(client, _data_url(one)).json()["choices"][0]["message"]["content"]
            assert expected
            for url in (f"{base}/cat.png", "picture0.png", f"file://{one}"):
                response = ask(client, url)
                assert response.status_code == 200, (url, response.text)
                assert response.json()["choices"][0]["message"]["content"] == expected
            refused = [(f"http://localhost:{server.server_address[1]}/cat.png", 400, "only"),
                       (f"{base}/elsewhere.png", 400, "redirects are not followed"),
                       (f"{base}/missing.png", 400, "HTTP 404"),
                       ("../secret.png", 400, "outside"), (f"file://{tmp_path}/secret.png",
                                                           400, "outside"),
                       ("nothing-here.png", 404, "no image file"), ("ftp://x/y.png", 400, "only")]
            for url, status, words in refused:
                response = ask(client, url)
                assert response.status_code == status, (url, response.text)
                assert words in response.json()["error"]["message"], (url, response.text)
        # By default the server fetches and reads nothing.
        with TestClient(create_app(tiny_vlm, settings=ServeSettings())) as client:
            for url, words in ((f"{base}/cat.png", "fetches no URLs"),
                               (str(one), "reads no local files")):
                response = ask(client, url)
                assert response.status_code == 400 and words in response.text
    finally:
        server.shutdown()


# --- vlm-eval with a Qwen2-VL model ---------------------------------------------------------------

@pytest.fixture
def qwen(built, tmp_path_factory) -> Family:
    if "qwen2_vl" not in built:
        built["qwen2_vl"] = _build("qwen2_vl", tmp_path_factory)
    return built["qwen2_vl"]


def test_vlm_eval_runs_a_qwen2_vl_model(qwen: Family, tmp_path: Path) -> None:
    from imagefm.apps.quickstart import SCENE_STYLES
    from imagefm.eval.vqa import answer, vqa_questions

    result = run("vlm-eval", qwen.directory, "--questions", "2", "--splits", "all",
                 "--captions", "0", "--no-blind", "--image-size", "56", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["vqa"][0]["n"] == 4  # 2 questions in each of en and ko
    # The batched, left-padded answers (M-RoPE positions per row) are each row's greedy reply.
    items = vqa_questions(2, lang="ko", split="all", image_size=56, seed=12345,
                          style=SCENE_STYLES["clean"])
    batched = answer(qwen.model, chat_processor(qwen.model), [i[0] for i in items],
                     [i[2] for i in items])
    for (image, _, question, _), text in zip(items, batched, strict=True):
        batch = qwen.processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": question}]}])
        eos, stops = chat_stops(qwen.model.lm)
        out = qwen.model.generate(**batch, max_new_tokens=16, eos_token_id=eos)
        assert decode_replies(qwen.model, out[:, batch["input_ids"].shape[1]:], eos, stops) \
            == [text]
    predicted = [e["predicted"] for e in report["vqa"][0]["examples"] if e["lang"] == "ko"]
    assert predicted == batched


# --- messages → content parts ---------------------------------------------------------------------

def test_image_marks_become_parts_in_order() -> None:
    cat, dog = object(), object()
    [conversation] = with_image_parts([[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is it?<image>"},
        {"role": "assistant", "content": ""}]], [cat, dog])
    assert conversation[1]["content"] == [{"type": "image", "image": cat},
                                          {"type": "text", "text": "What is it?"},
                                          {"type": "image", "image": dog}]
    assert conversation[2]["content"] == [{"type": "text", "text": ""}]
    # One image per conversation and no mark: first in the first user turn.
    rows = with_image_parts([[{"role": "user", "content": "a?"}],
                             [{"role": "user", "content": [{"type": "text", "text": "b?"}]}]],
                            [cat, dog])
    assert [r[0]["content"][0]["image"] for r in rows] == [cat, dog]
    with pytest.raises(ChatTemplateError, match="2 image placeholder"):
        with_image_parts([[{"role": "user", "content": "<image><image>"}]], [cat])


def test_chat_session_takes_an_attached_image_in_every_family(family: Family) -> None:
    one, _ = family.images
    session = ChatSession(family.model, max_new_tokens=N)
    session.attach(one.read_bytes())  # bytes, decoded when attached
    assert "".join(session.send(QUESTION_EN)) == family.greedy([("user", [one], QUESTION_EN)])
