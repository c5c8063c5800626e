"""Chat templates (ChatML and a checkpoint's Jinja template, rendered as transformers renders
them) and the ``imagefm generate`` command on a tiny HF Llama directory with a tokenizer."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
import torch

from imagefm.chat import (
    ChatTemplate,
    ChatTemplateError,
    chat_stops,
    chatml_segments,
    encode_chat,
    render_chatml,
)

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "이 사진에 무엇이 있나요?"}]},
                {"role": "assistant", "content": "고양이가 있어요."},
                {"role": "user", "content": "몇 마리?"}]


# A template in the style HF checkpoints ship: loop controls, raise_exception, tojson.
JINJA = """{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant'] %}
{{- raise_exception('bad role ' + message['role']) }}
{%- endif %}
{{- bos_token + '[' + message['role'] + '] ' }}
{%- if message['content'] is string %}{{ message['content'] }}
{%- else %}{% for part in message['content'] %}
{%- if part['type'] == 'text' %}{{ part['text'] }}{% else %}<img>{% endif %}
{%- endfor %}{% endif %}
{{- eos_token + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}
{%- if tools %}{{ tools | tojson }}{% endif %}"""


def test_chatml_rendering_and_assistant_spans() -> None:
    text = render_chatml(CONVERSATION)
    assert text == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                    "<|im_start|>user\n<image>이 사진에 무엇이 있나요?<|im_end|>\n"
                    "<|im_start|>assistant\n고양이가 있어요.<|im_end|>\n"
                    "<|im_start|>user\n몇 마리?<|im_end|>\n<|im_start|>assistant\n")
    segments = chatml_segments(CONVERSATION)
    assert "".join(t for t, _ in segments) == text
    assert [t for t, reply in segments if reply] == ["고양이가 있어요.<|im_end|>"]
    assert not render_chatml(CONVERSATION, add_generation_prompt=False).endswith("assistant\n")


def test_text_is_nfc_normalised() -> None:
    decomposed = unicodedata.normalize("NFD", "한국어")
    assert decomposed != "한국어"
    text = ChatTemplate().render([{"role": "user", "content": decomposed}])
    assert "한국어" in text and decomposed not in text


def test_jinja_template_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    reference.chat_template = JINJA
    template = ChatTemplate(JINJA, bos_token="<s>", eos_token="</s>")
    tools = [{"name": "계산기", "description": "adds"}]
    for prompt in (True, False):
        ours = template.render(CONVERSATION, add_generation_prompt=prompt, tools=tools)
        theirs = reference.apply_chat_template(CONVERSATION, tokenize=False, tools=tools,
                                               add_generation_prompt=prompt)
        assert ours == theirs
    assert "계산기" in ours  # tojson keeps Hangul as it is
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="role"):
        template.render([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="compile"):
        ChatTemplate("{% for %}")


def test_stop_strings_follow_the_template() -> None:
    assert ChatTemplate().stop_strings == ("<|im_end|>",)
    assert ChatTemplate(JINJA, eos_token="</s>").stop_strings == ("</s>",)


# --- a tiny HF Llama directory with a tokenizer and chat template, and the CLI -------------------

def test_hf_directory_brings_tokenizer_and_template(tiny_llama_dir: Path) -> None:
    import transformers

    import imagefm

    model = imagefm.load(tiny_llama_dir)
    reference = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert model.chat_template == reference.chat_template
    messages = [{"role": "user", "content": "the small dog"}]
    assert encode_chat(model, messages) == reference.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    # <|im_end|> is a special token: it must stop generation by id (decoding drops it)
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    model.config = model.config.replace(eos_token_ids=())
    assert chat_stops(model) == ([im_end], ())
    model.chat_template = JINJA.replace("eos_token", "'[end]'")
    assert chat_stops(model) == ([], ())  # no EOS text known: nothing to stop on but length
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    assert "chat_template" in config or (tiny_llama_dir / "chat_template.jinja").is_file()


def test_generate_command_streams_the_greedy_continuation(tiny_llama_dir: Path) -> None:
    import typer
    from typer.testing import CliRunner

    import imagefm
    from imagefm.cli.lm import register

    app = typer.Typer()
    register(app)

    @app.command()
    def version() -> None:  # a second command keeps typer in multi-command mode
        """unused"""

    model = imagefm.load(tiny_llama_dir)
    ids = model.tokenizer.encode("the small cat")
    expected = model.tokenizer.decode(model.generate(torch.tensor([ids]),
                                                     max_new_tokens=12)[0, len(ids):])
    result = CliRunner().invoke(app, ["generate", str(tiny_llama_dir), "the small cat", "--raw",
                                      "-n", "12"])
    assert result.exit_code == 0, result.output
    # stream_text stops at the EOS id, which decode would drop anyway
    assert result.output == expected + "\n"
    chat = CliRunner().invoke(app, ["generate", str(tiny_llama_dir), "작은 고양이", "-n", "5",
                                    "--temperature", "0.7", "--seed", "3"])
    assert chat.exit_code == 0, chat.output


def test_imagefm_format_round_trip_keeps_weights_tokenizer_and_template(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import imagefm
    from imagefm.cli import app
    from imagefm.loading import detect_format

    model = imagefm.load(tiny_llama_dir)
    out = model.save_pretrained(tmp_path / "ours")
    assert detect_format(out) == "imagefm"
    again = imagefm.load(out)
    assert again.config == model.config
    assert again.chat_template == model.chat_template
    ids = torch.tensor([model.tokenizer.encode("the small cat")])
    assert again.tokenizer.encode("the small cat") == ids[0].tolist()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    info = CliRunner().invoke(app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "decoder_lm (llama)" in info.output and "chat template  own" in info.output
    back = CliRunner().invoke(app, ["convert", str(out), str(tmp_path / "hf"), "--to", "hf"])
    assert back.exit_code == 0, back.output
    torch.testing.assert_close(imagefm.load(tmp_path / "hf")(ids).logits, model(ids).logits)


def test_vocabulary_extension_makes_syllables_whole_tokens(tiny_llama_dir: Path,
                                                           tmp_path: Path) -> None:
    import imagefm
    from imagefm.models.vocab import extend_vocabulary, hangul_syllables, tokens_per_syllable

    model = imagefm.load(tiny_llama_dir)
    tokenizer = model.tokenizer
    corpus = ["작은 고양이가 있다", "큰 강아지 그림", "고양이"]
    held_out = ["작은 강아지", "고양이 그림이 있다"]
    syllables = hangul_syllables(corpus)
    assert syllables[0] in ("고", "양", "이")  # the most frequent come first
    english = torch.tensor([tokenizer.encode("the small cat")])
    old_logits = model(english).logits
    old_embed = model.embed_tokens.weight.detach().clone()
    before = tokens_per_syllable(tokenizer, held_out)
    spelled = {s: tokenizer.pieces(s) for s in syllables}

    ids = extend_vocabulary(model, syllables)

    grown = [s for s in syllables if len(spelled[s]) > 1]  # one-piece syllables gain nothing
    assert len(ids) == len(grown) > 0
    assert model.config.vocab_size == tokenizer.vocab_size == old_embed.shape[0] + len(ids)
    assert tokens_per_syllable(tokenizer, held_out) == 1.0 < before
    for syllable, index in zip(grown, ids, strict=True):
        assert tokenizer.pieces(syllable) == [index]
        torch.testing.assert_close(model.embed_tokens.weight[index],
                                   old_embed[spelled[syllable]].mean(0))
        torch.testing.assert_close(model.lm_head.weight[index].float(),
                                   model.lm_head.weight[spelled[syllable]].float().mean(0))
    # Old ids and outputs on old-only text are unchanged; decoding round-trips the new tokens.
    assert tokenizer.encode("the small cat") == english[0].tolist()
    torch.testing.assert_close(model(english).logits[..., :old_embed.shape[0]], old_logits)
    assert tokenizer.decode(tokenizer.encode("작은 강아지")) == "작은 강아지"
    assert extend_vocabulary(model, syllables) == []  # nothing left to add
    # The extension travels with the checkpoint.
    again = imagefm.load(model.save_pretrained(tmp_path / "extended"))
    assert again.tokenizer.pieces("강아지") == tokenizer.pieces("강아지")
    torch.testing.assert_close(again(english).logits, model(english).logits)


def test_extend_vocab_command_writes_the_extended_model(tiny_llama_dir: Path,
                                                        tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import imagefm
    from imagefm.cli import app

    corpus = tmp_path / "ko.txt"
    corpus.write_text("작은 고양이가 있다\n큰 강아지 그림\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["extend-vocab", str(tiny_llama_dir), str(tmp_path / "out"),
                                      "--corpus", str(corpus)])
    assert result.exit_code == 0, result.output
    assert "tokens per syllable" in result.output and "-> 1.00" in result.output
    extended = imagefm.load(tmp_path / "out")
    tokenizer = extended.tokenizer
    assert tokenizer.pieces("강아지") == [tokenizer.token_to_id(s) for s in "강아지"]
    missing = CliRunner().invoke(app, ["extend-vocab", str(tiny_llama_dir), str(tmp_path / "x")])
    assert missing.exit_code != 0 and "--corpus" in missing.output
