"""Caption, ask and chat with a VLM: the Python API (equal to greedy ``vlm.generate`` on the same
prompt) and the ``imagefm caption`` / ``ask`` / ``chat`` commands, chat driven through stdin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import imagefm
from imagefm.apps.vlm_chat import ChatSession, PromptTooLong, ask, caption, stream_reply
from imagefm.chat import chat_stops
from imagefm.cli import app
from imagefm.data.image import ImageDecodeError
from imagefm.models.vlm import VLM
from imagefm.train.vlm_data import DESCRIBE
from imagefm.vlm_processor import VLMProcessor

N = 10  # new tokens per reply: enough to see text, few enough to stay fast


def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)


def greedy(vlm: VLM, messages: list[dict[str, str]], images: list[np.ndarray],
           n: int = N) -> str:
    """The reference: ``vlm.generate`` on the processor's prompt, new ids cut at the end of the
    turn, decoded."""
    batch = VLMProcessor.for_model(vlm).prompt([messages], images)
    eos, stops = chat_stops(vlm.lm)
    out = vlm.generate(**batch, max_new_tokens=n, eos_token_id=eos, stop_strings=stops)
    new = out[0, batch["input_ids"].shape[1]:].tolist()
    ends = [i for i, token in enumerate(new) if token in eos]
    text = vlm.tokenizer.decode(new[:ends[0]] if ends else new)
    for stop in stops:
        text = text.split(stop)[0]
    return text


def test_caption_and_ask_equal_greedy_generate(tiny_vlm: VLM) -> None:
    image = picture(0)
    for lang in ("en", "ko"):
        expected = greedy(tiny_vlm, [{"role": "user", "content": DESCRIBE[lang]}], [image])
        assert expected  # the comparison below is between real texts
        assert caption(tiny_vlm, image, lang=lang, max_new_tokens=N) == expected
    question = "이 사진에 무엇이 있나요?"
    assert ask(tiny_vlm, image, question, max_new_tokens=N) == greedy(
        tiny_vlm, [{"role": "user", "content": question}], [image])
    with pytest.raises(ValueError, match="choose from"):
        caption(tiny_vlm, image, lang="fr")


def test_reply_streams_pieces_and_reports_counts(tiny_vlm: VLM) -> None:
    calls = []
    tiny_vlm.lm.register_forward_hook(lambda *_: calls.append(1))
    reply = stream_reply(tiny_vlm, [{"role": "user", "content": "the dog?"}], [picture(1)],
                         max_new_tokens=N, stop=("zzz",))
    pieces = []
    for piece in reply:
        pieces.append((piece, len(calls)))
    assert "".join(p for p, _ in pieces) == reply.text
    # Text arrives while decoding runs, not all at the end.
    assert pieces[0][1] < len(calls)
    batch = VLMProcessor.for_model(tiny_vlm).prompt(
        [[{"role": "user", "content": "the dog?"}]], [picture(1)])
    assert reply.prompt_tokens == batch["input_ids"].shape[1]
    if reply.finish_reason == "length":
        assert reply.completion_tokens == N
    else:
        assert reply.finish_reason == "stop" and reply.completion_tokens <= N


def test_sampling_with_a_seed_repeats(tiny_vlm: VLM) -> None:
    image = picture(2)
    first = ask(tiny_vlm, image, "the dog?", temperature=1.5, seed=7, max_new_tokens=N)
    again = ask(tiny_vlm, image, "the dog?", temperature=1.5, seed=7, max_new_tokens=N)
    others = {ask(tiny_vlm, image, "the dog?", temperature=1.5, seed=s, max_new_tokens=N)
              for s in range(4)}
    assert first == again and len(others) > 1


def test_chat_session_turns_images_and_reset(tiny_vlm: VLM) -> None:
    image = picture(3)
    session = ChatSession(tiny_vlm, max_new_tokens=N)
    first = "".join(session.send("the dog?", images=[image]))
    user1 = {"role": "user", "content": "<image>\nthe dog?"}
    assert first == greedy(tiny_vlm, [user1], [image])
    second = "".join(session.send("작은?"))
    history = [user1, {"role": "assistant", "content": first}, {"role": "user", "content": "작은?"}]
    assert second == greedy(tiny_vlm, history, [image])
    assert len(session.messages) == 4 and len(session.images) == 1
    # A bad image is refused when attached and leaves the conversation as it was.
    with pytest.raises(ImageDecodeError):
        session.attach(b"not an image")
    with pytest.raises(PromptTooLong, match="context"):
        session.send("the dog runs " * 200)
    assert len(session.messages) == 4 and not session.pending
    session.reset()
    assert session.messages == [] and "".join(session.send("the dog?", [image])) == first


# --- the commands ---------------------------------------------------------------------------------

@pytest.fixture
def saved(tiny_vlm: VLM, tmp_path: Path) -> tuple[Path, VLM, list[Path]]:
    tiny_vlm.save_pretrained(tmp_path / "vlm")
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"img{seed}.png")
        Image.fromarray(picture(seed)).save(paths[-1])
    return tmp_path / "vlm", imagefm.load(tmp_path / "vlm"), paths


def run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=stdin)


def test_caption_and_ask_commands(saved) -> None:
    model, vlm, (one, two) = saved
    result = run("caption", one, "--model", model, "-n", N)
    assert result.exit_code == 0, result.output
    assert result.stdout == caption(vlm, one, max_new_tokens=N) + "\n"
    result = run("caption", one, two, "--model", model, "--lang", "ko", "-n", N)
    assert result.stdout.split("\n")[:-1] == [f"{p}\t{caption(vlm, p, 'ko', max_new_tokens=N)}"
                                          for p in (one, two)]
    result = run("ask", one, "이 사진에 무엇이 있나요?", "--model", model, "-n", N,
                 "--temperature", "1.2", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert result.stdout == ask(vlm, one, "이 사진에 무엇이 있나요?", max_new_tokens=N,
                                temperature=1.2, seed=5) + "\n"


def test_chat_command_through_piped_stdin(saved) -> None:
    model, vlm, (one, two) = saved
    script = f"the dog?\n/image {two}\n\n/image {model}/missing.png\nwhat is it?\n/reset\n" \
             f"the dog?\n/quit\nnever read\n"
    result = run("chat", "--model", model, "-n", N, stdin=script)
    assert result.exit_code == 0, result.output
    session = ChatSession(vlm, max_new_tokens=N)
    first = "".join(session.send("the dog?"))
    second = "".join(session.send("what is it?", images=[two]))
    assert first and second  # real replies, so the comparison means something
    assert result.stdout == f"{first}\n{second}\n{first}\n"
    assert "missing.png" in result.stderr and "Traceback" not in result.output
    # --image attaches to the first message.
    result = run("chat", "--model", model, "--image", one, "-n", N, stdin="the dog?\n")
    assert result.stdout == "".join(ChatSession(vlm, max_new_tokens=N).send("the dog?", [one])) \
        + "\n"


def test_unreadable_images_exit_2_without_traceback(saved, tmp_path: Path) -> None:
    model, _, (one, _) = saved
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    for args in (["caption", one, broken], ["ask", broken, "what?"],
                 ["caption", tmp_path / "nowhere.jpg"], ["chat", "--image", broken]):
        result = run(*args, "--model", model)
        assert result.exit_code == 2, (args, result.output)
        assert "cannot read image" in result.stderr and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    result = run("ask", one, "what?", "--model", tmp_path / "no-model")
    assert result.exit_code == 2 and "cannot load" in result.stderr


def test_language_model_chats_but_cannot_caption(tiny_llama_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    Image.fromarray(picture(0)).save(image)
    result = run("caption", image, "--model", tiny_llama_dir)
    assert result.exit_code == 2 and "vision-language" in result.stderr
    result = run("chat", "--model", tiny_llama_dir, "-n", N, stdin="the dog?\n")
    assert result.exit_code == 0, result.output
    lm = imagefm.load(tiny_llama_dir)
    assert result.stdout == "".join(ChatSession(lm, max_new_tokens=N).send("the dog?")) + "\n"
    with pytest.raises(ValueError, match="takes no images"):
        ChatSession(lm).attach(torch.zeros(4, 4, 3, dtype=torch.uint8).numpy())
