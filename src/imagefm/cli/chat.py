"""Talking to a VLM (any family: LLaVA-style, Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision,
Idefics3 / SmolVLM): ``imagefm caption``, ``imagefm ask`` and the interactive ``imagefm chat``.

    imagefm caption photo.jpg more.png --model runs/vlm-sft/final --lang ko
    imagefm ask photo.jpg "이 사진에 무엇이 있나요?" --model runs/vlm-sft/final
    imagefm ask --audio question.wav --image photo.jpg --model runs/vlm-speech/final   # spoken
    imagefm chat --model runs/vlm-sft/final --image photo.jpg    # /image PATH, /reset, /quit

Replies stream to stdout as they are generated; notices go to stderr, so piping ``chat`` (stdin
from a file, stdout to another) gives just the replies, one after another.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

CHAT_HELP = ("Type a message and press Enter. /image PATH attaches an image to your next message, "
             "/reset starts over, /quit (or end of input) leaves.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _model_option() -> Any:
    return typer.Option(..., "--model", "-m",
                        help="A VLM: imagefm checkpoint, or Hugging Face LLaVA, Qwen2-VL / "
                             "Qwen2.5-VL, LLaVA-OneVision or SmolVLM / Idefics3 (a folder or "
                             "Hub id); chat also takes a language model.")


def _load(path: Path, device: str, *, need_vision: bool) -> Any:
    import imagefm
    from imagefm.apps.search.index import pick_device
    from imagefm.apps.vlm_chat import is_chat_model
    from imagefm.checkpoint import CheckpointError
    from imagefm.config import ConfigError
    from imagefm.vlm_runtime import is_vlm

    try:
        model = imagefm.load(path)
    except (CheckpointError, ConfigError, OSError) as err:
        _fail(f"cannot load {path}: {err}")
    if not is_chat_model(model) or (need_vision and not is_vlm(model)):
        _fail(f"{path} holds a {type(model).__name__}: this command needs a vision-language "
              f"model{'' if need_vision else ' or a language model'}")
    return model.to(pick_device(device)).eval()


def _open(path: Path) -> Any:
    """The decoded image, or a clear error and exit code 2."""
    from imagefm.data.image import ImageDecodeError, open_image

    try:
        return open_image(path)
    except ImageDecodeError as err:
        _fail(f"cannot read image {path}: {err.reason}")


def _spoken(vlm: Any, path: Path) -> tuple[str, Any]:
    """The audio placeholder of ``vlm``'s processor and the decoded clip at its sampling rate,
    or a clear error and exit code 2."""
    from imagefm.data.audio import AudioError, load_audio
    from imagefm.vlm_runtime import chat_processor

    processor = chat_processor(vlm)
    if not getattr(processor, "takes_audio", False):
        _fail("this model has no audio tower: ask the question as text (add one with "
              "imagefm vlm-add-audio, then train it)")
    try:
        return processor.audio_marker, load_audio(path, processor.audio.sampling_rate,
                                                  max_seconds=processor.audio.seconds)
    except AudioError as err:
        _fail(f"cannot read audio {path}: {err}")


def _options(max_new_tokens: int, temperature: float, seed: int | None) -> dict[str, Any]:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}


def _stream(pieces: Any) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    max_tokens_option = typer.Option(128, "--max-new-tokens", "-n", min=1,
                                     help="Longest reply, in tokens.")
    temperature_option = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples.")
    seed_option = typer.Option(None, help="Seed for sampling (same seed, same reply).")
    device_option = typer.Option("auto", help="auto, cpu, cuda...")

    @app.command()
    def caption(
        images: list[Path] = typer.Argument(..., metavar="IMG...", help="Image files."),
        model: Path = _model_option(),
        lang: str = typer.Option("en", help="Language of the captions: en or ko."),
        max_new_tokens: int = max_tokens_option,
        temperature: float = temperature_option,
        seed: int = seed_option,
        device: str = device_option,
    ) -> None:
        """Describe each image (one image: the caption; several: PATH<TAB>caption lines)."""
        from imagefm.apps.vlm_chat import caption as describe
        from imagefm.train.vlm_data import DESCRIBE

        if lang not in DESCRIBE:
            _fail(f"--lang {lang!r}: choose from {', '.join(DESCRIBE)}")
        pictures = [_open(path) for path in images]  # all readable before the model loads
        vlm = _load(model, device, need_vision=True)
        for path, picture in zip(images, pictures, strict=True):
            text = describe(vlm, picture, lang, **_options(max_new_tokens, temperature, seed))
            typer.echo(text if len(images) == 1 else f"{path}\t{text}")

    @app.command()
    def ask(
        image: Path = typer.Argument(None, metavar="IMG", help="Image file (or --image)."),
        question: str = typer.Argument(None, help="The question, in any language the model "
                                                  "knows (it answers in kind); optional with "
                                                  "--audio."),
        model: Path = _model_option(),
        image_option: Path = typer.Option(None, "--image", help="Image file (instead of IMG)."),
        audio: Path = typer.Option(None, "--audio",
                                   help="The question spoken (WAV, FLAC, OGG, MP3), for a VLM "
                                        "with an audio tower."),
        max_new_tokens: int = max_tokens_option,
        temperature: float = temperature_option,
        seed: int = seed_option,
        device: str = device_option,
    ) -> None:
        """Answer a question about an image, typed or spoken (--audio), streaming the answer."""
        from imagefm.apps.vlm_chat import stream_reply

        if image_option is not None:  # with --image, a positional argument is the question
            if question is not None:
                _fail("give the image once: IMG or --image")
            image, question = image_option, None if image is None else str(image)
        if image is None:
            _fail("give an image: IMG or --image PATH")
        if question is None and audio is None:
            _fail("give a question: as text, or spoken with --audio FILE")
        picture = _open(image)
        vlm = _load(model, device, need_vision=True)
        content, clips = question or "", []
        if audio is not None:
            marker, clip = _spoken(vlm, audio)
            content, clips = marker + (f"\n{question}" if question else ""), [clip]
        _stream(stream_reply(vlm, [{"role": "user", "content": content}], [picture],
                             audios=clips, **_options(max_new_tokens, temperature, seed)))

    @app.command()
    def chat(
        model: Path = _model_option(),
        image: Path = typer.Option(None, "--image", help="An image for the first message."),
        system: str = typer.Option(None, help="System message."),
        max_new_tokens: int = max_tokens_option,
        temperature: float = temperature_option,
        seed: int = seed_option,
        device: str = device_option,
    ) -> None:
        """Chat with a VLM (or LM) in the terminal, replies streaming. Reads messages from stdin
        one line each, so it can be piped."""
        from imagefm.apps.vlm_chat import ChatSession

        picture = _open(image) if image is not None else None
        loaded = _load(model, device, need_vision=picture is not None)
        session = ChatSession(loaded, system=system,
                              **_options(max_new_tokens, temperature, seed))
        if picture is not None:
            session.attach(picture)
        interactive = sys.stdin.isatty()
        if interactive:
            typer.echo(CHAT_HELP, err=True)
        while True:
            line = _read_line(interactive)
            if line is None or line.strip() in ("/quit", "/exit"):
                break
            _chat_turn(session, line.strip())


def _read_line(interactive: bool) -> str | None:
    """The next line of input (None at its end); shows a prompt only to a person."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _chat_turn(session: Any, line: str) -> None:
    from imagefm.apps.vlm_chat import PromptTooLong
    from imagefm.data.image import ImageDecodeError

    if not line:
        return
    if line == "/reset":
        session.reset()
        typer.echo("(conversation reset)", err=True)
    elif line.startswith("/image"):
        path = line[len("/image"):].strip()
        try:
            if not path:
                raise ValueError("give a path: /image PATH")
            session.attach(Path(path).expanduser())
            typer.echo(f"(attached {path} to your next message)", err=True)
        except (ImageDecodeError, ValueError) as err:
            # A typo must not end the conversation: say why and carry on.
            typer.echo(f"error: {err}", err=True)
    elif line.startswith("/") and line.split()[0] in ("/help", "/?"):
        typer.echo(CHAT_HELP, err=True)
    else:
        try:
            pieces = session.send(line)
        except PromptTooLong as err:
            typer.echo(f"error: {err} (/reset starts a new conversation)", err=True)
            return
        try:
            _stream(pieces)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            sys.stdout.write("\n")
