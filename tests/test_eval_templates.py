from __future__ import annotations

import unicodedata

import pytest

from imagefm.eval.templates import (
    available_languages,
    load_templates,
    parse_templates,
    render,
    render_all,
    resolve_classnames,
)

# name → (object particle 을/를, subject particle 이/가, copula (이)다, polite copula)
KOREAN_FORMS = {
    "고양이": ("고양이를", "고양이가", "고양이다", "고양이예요"),  # vowel-final
    "자동차": ("자동차를", "자동차가", "자동차다", "자동차예요"),  # vowel-final
    "사슴": ("사슴을", "사슴이", "사슴이다", "사슴이에요"),  # final ㅁ
    "말": ("말을", "말이", "말이다", "말이에요"),  # final ㄹ
    "곰": ("곰을", "곰이", "곰이다", "곰이에요"),  # final ㅁ
}


@pytest.mark.parametrize("name", list(KOREAN_FORMS))
def test_korean_particles_and_copula_follow_the_last_sound(name: str) -> None:
    obj, subj, copula, polite = KOREAN_FORMS[name]
    assert render("{}을/를 찍은 사진", name, "ko") == f"{obj} 찍은 사진"
    assert render("{}이/가 있는 사진", name, "ko") == f"{subj} 있는 사진"
    assert render("이것은 {}(이)다.", name, "ko") == f"이것은 {copula}."
    assert render("이건 {}이에요/예요.", name, "ko") == f"이건 {polite}."
    assert render("{}의 사진", name, "ko") == f"{name}의 사진"  # 의 has one form


@pytest.mark.parametrize("name", list(KOREAN_FORMS))
def test_shipped_korean_templates_render_without_leftover_markers(name: str) -> None:
    prompts = render_all(load_templates("ko"), name, "ko")
    assert 10 <= len(prompts) <= 20
    obj, subj, copula, _ = KOREAN_FORMS[name]
    assert f"{obj} 찍은 사진" in prompts
    assert f"{subj} 찍힌 사진" in prompts
    assert f"이것은 {copula}." in prompts
    for prompt in prompts:
        assert "/" not in prompt and "(" not in prompt and "{" not in prompt, prompt
        assert name in prompt


def test_korean_rendering_is_nfc_even_for_decomposed_input() -> None:
    decomposed = unicodedata.normalize("NFD", "사슴")
    assert decomposed != "사슴"
    prompt = render(unicodedata.normalize("NFD", "{}을/를 찍은 사진"), decomposed, "ko")
    assert prompt == "사슴을 찍은 사진"
    assert unicodedata.is_normalized("NFC", prompt)


def test_english_templates_fix_the_article() -> None:
    assert render("a photo of a {}.", "apple", "en") == "a photo of an apple."
    assert render("a photo of a {}.", "cat", "en") == "a photo of a cat."
    assert render("A {} in a video game.", "owl", "en") == "An owl in a video game."
    # Only an article right before the name changes.
    assert render("a toy {}.", "elephant", "en") == "a toy elephant."
    assert render("a {}.", "{weird}", "en") == "a {weird}."  # braces in names are kept
    prompts = render_all(load_templates("en"), "dog", "en")
    assert 10 <= len(prompts) <= 20 and "a photo of a dog." in prompts


def test_template_files_are_validated() -> None:
    assert available_languages() == ["en", "ko"]
    with pytest.raises(ValueError, match="exactly one"):
        parse_templates("a photo\n", "x.txt")
    with pytest.raises(ValueError, match="unknown particle pair"):
        parse_templates("{}을/가 사진\n", "x.txt")
    with pytest.raises(ValueError, match="no templates"):
        parse_templates("# only a comment\n\n", "x.txt")
    assert parse_templates("# c\n{} 사진\n\n{}을/를 본다\n") == ["{} 사진", "{}을/를 본다"]
    with pytest.raises(ValueError, match="no zero-shot templates"):
        load_templates("xx")


def test_resolve_classnames_forms() -> None:
    mapping = {"cat": "고양이", "horse": "말"}
    assert resolve_classnames(mapping, "en") == ["cat", "horse"]
    assert resolve_classnames(mapping, "ko") == ["고양이", "말"]
    per_lang = {"en": ["cat", "horse"], "ko": ["고양이", "말"]}
    assert resolve_classnames(per_lang, "ko") == ["고양이", "말"]
    assert resolve_classnames([" cat ", "horse"], "ko") == ["cat", "horse"]
    with pytest.raises(ValueError, match="no class names for language 'ja'"):
        resolve_classnames(per_lang, "ja")
    with pytest.raises(ValueError, match="non-empty"):
        resolve_classnames(["cat", ""], "en")
    with pytest.raises(TypeError):
        resolve_classnames("cat", "en")  # type: ignore[arg-type]
