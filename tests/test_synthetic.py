"""Synthetic data engine: determinism, Korean grammar, held-out splits, QA truth, shards."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
import unicodedata

import numpy as np
import pytest
from PIL import Image

from imagefm.data.records import Record
from imagefm.data.synthetic import (
    COLOURS,
    DEFAULT_HELD_OUT,
    SHAPES,
    Background,
    SceneConfig,
    SceneSpec,
    SynthSpec,
    benchmark,
    class_names,
    find_hangul_fonts,
    generate,
    render_scene,
    sample_scene,
    text_render,
    write_shards,
)
from imagefm.data.synthetic.korean import (
    attach,
    count_phrase,
    ends_in_rieul,
    has_batchim,
    native_number,
)

SIZE = 32  # small images keep the tests fast


def _all_text(record: Record) -> list[str]:
    return [c.text for c in record.captions] + [t.content for t in record.conversation]


# ------------------------------------------------------------------ Korean grammar
def test_batchim_matches_unicode_decomposition() -> None:
    # Reference: NFD splits a syllable into 2 jamo (no final) or 3 (with final; ㄹ is U+11AF).
    for code in range(0xAC00, 0xD7A4, 7):
        syllable = chr(code)
        jamo = unicodedata.normalize("NFD", syllable)
        assert has_batchim(syllable) == (len(jamo) == 3), syllable
        assert ends_in_rieul(syllable) == (jamo[-1] == "\u11af"), syllable


@pytest.mark.parametrize(("word", "spec", "expected"), [
    ("사과", "을/를", "사과를"), ("수박", "을/를", "수박을"), ("원", "이/가", "원이"),
    ("하트", "이/가", "하트가"), ("별", "(으)로", "별로"), ("사과", "(으)로", "사과로"),
    ("수박", "(으)로", "수박으로"), ("원", "와/과", "원과"), ("하트", "와/과", "하트와"),
    ("삼각형", "은/는", "삼각형은"), ("네모", "은/는", "네모는"), ("물", "으로/로", "물로"),
    ("별", "이/가", "별이"), ("하트", "(이)다", "하트다"), ("원", "(이)다", "원이다"),
    ('"은행"', "(이)라고", '"은행"이라고'), ('"출구"', "(이)라고", '"출구"라고'),
    ("3", "이/가", "3이"), ("2", "이/가", "2가"), ("7", "(으)로", "7로"), ("원", "의", "원의"),
])
def test_attach_particles(word: str, spec: str, expected: str) -> None:
    assert attach(word, spec) == expected


def test_attach_rejects_unknown_pair() -> None:
    with pytest.raises(ValueError, match="unknown particle pair"):
        attach("원", "도/만")


def test_counters_use_native_numerals() -> None:
    expected = {1: "한 개", 2: "두 개", 3: "세 개", 4: "네 개", 5: "다섯 개", 10: "열 개",
                11: "열한 개", 20: "스무 개", 21: "스물한 개", 99: "아흔아홉 개"}
    for n, text in expected.items():
        assert count_phrase(n) == text
    assert count_phrase(3, "마리") == "세 마리"
    assert count_phrase(150) == "150개"
    assert native_number(2, attributive=False) == "둘"
    assert native_number(20, attributive=False) == "스물"


# ------------------------------------------------------------------ vocabulary
def test_colours_are_distinguishable_and_names_are_exposed() -> None:
    rgbs = [np.array(c.rgb, float) for c in COLOURS.values()]
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgbs, 2))
    assert closest > 70
    for attribute in ("colour", "shape"):
        for lang in ("en", "ko"):
            names = class_names(attribute, lang)
            assert len(set(names.values())) == len(names)
            assert all(unicodedata.is_normalized("NFC", v) for v in names.values())
    assert class_names("colour", "ko")["red"] == "빨간색"
    assert class_names("shape", "ko")["circle"] == "원"


# ------------------------------------------------------------------ determinism
def _digest(records: list[Record]) -> list[tuple[bytes, str]]:
    return [(r.image, json.dumps(r.to_json(), sort_keys=True, ensure_ascii=False))
            for r in records]


@pytest.mark.parametrize("kind", ["scenes", "vqa", "defects"])
def test_same_seed_same_bytes_any_worker_count(kind: str) -> None:
    one = list(generate(kind, 40, seed=3, image_size=SIZE, workers=1))
    two = list(generate(kind, 40, seed=3, image_size=SIZE, workers=2))
    other = list(generate(kind, 40, seed=4, image_size=SIZE, workers=1))
    assert len(one) == 40
    assert _digest(one) == _digest(two)
    assert sum(a != b for a, b in zip(_digest(one), _digest(other), strict=True)) > 30


def test_shards_are_byte_identical_across_runs(tmp_path) -> None:
    spec = SynthSpec("scenes", 48, seed=5, image_size=SIZE)
    write_shards(spec, tmp_path / "a", shard_size=20, workers=1)
    write_shards(spec, tmp_path / "b", shard_size=20, workers=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_bad_requests_fail_before_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        generate("clouds", 4)
    with pytest.raises(ValueError, match="bad option"):
        generate("scenes", 4, defect_rate=0.2)
    with pytest.raises(ValueError, match="unknown"):
        generate("scenes", 4, held_out=[("red", "blob")])
    write_shards(SynthSpec("scenes", 2, image_size=SIZE), tmp_path, workers=1)
    with pytest.raises(FileExistsError):
        write_shards(SynthSpec("scenes", 2, image_size=SIZE), tmp_path, workers=1)


# ------------------------------------------------------------------ held-out compositions
def test_held_out_combos_never_in_train_and_only_in_eval() -> None:
    rng = np.random.default_rng(0)
    train = [sample_scene(rng, SceneConfig(split="train")) for _ in range(3000)]
    seen = set().union(*(s.combos for s in train))
    assert not seen & DEFAULT_HELD_OUT
    assert len(seen) == len(COLOURS) * len(SHAPES) - len(DEFAULT_HELD_OUT)
    evaluation = [sample_scene(rng, SceneConfig(split="eval")) for _ in range(500)]
    eval_seen = set().union(*(s.combos for s in evaluation))
    assert eval_seen == set(DEFAULT_HELD_OUT)

    custom = {("green", "circle"), ("grey", "star")}
    scenes = [sample_scene(rng, SceneConfig(split="train", held_out=frozenset(custom)))
              for _ in range(1000)]
    assert not set().union(*(s.combos for s in scenes)) & custom


def test_held_out_combos_never_named_in_train_text() -> None:
    phrases = {f"{COLOURS[c].en} {s}" for c, shape in DEFAULT_HELD_OUT
               for s in (SHAPES[shape].en, SHAPES[shape].en_plural)}
    phrases |= {f"{form} {name}" for c, shape in DEFAULT_HELD_OUT
                for form in COLOURS[c].ko_attributive
                for name in (SHAPES[shape].ko, *SHAPES[shape].ko_alternatives)}
    for kind in ("scenes", "vqa"):
        for record in generate(kind, 150, seed=1, image_size=SIZE, workers=1):
            text = " ".join(_all_text(record)).lower()
            assert not any(re.search(rf"\b{p}\b", text) for p in phrases), text
    for record in generate("scenes", 30, seed=1, image_size=SIZE, split="eval", workers=1):
        scene = SceneSpec.from_dict(record.meta["scene"])
        assert scene.combos <= DEFAULT_HELD_OUT and record.split == "eval"


# ------------------------------------------------------------------ scenes and captions
def test_rendered_scene_shows_the_spec() -> None:
    for colour in COLOURS:
        spec = SceneSpec.single("square", colour, region="left",
                                background=Background("plain", "white" if colour != "white"
                                                      else "black"))
        pixels = np.asarray(render_scene(spec, 64))
        exact = np.all(pixels == COLOURS[colour].rgb, axis=-1)
        ys, xs = np.nonzero(exact)
        assert exact.sum() > 200
        assert xs.mean() < 32  # on the left half
    with pytest.raises(ValueError, match="background colour"):
        SceneSpec.single("circle", "red", background=Background("plain", "red"))


def test_captions_name_every_object_and_count() -> None:
    for record in generate("scenes", 120, seed=2, image_size=SIZE, workers=1):
        scene = SceneSpec.from_dict(record.meta["scene"])
        assert len(record.captions_in("en")) >= 1 and len(record.captions_in("ko")) >= 1
        for obj in scene.objects:
            colour, shape = COLOURS[obj.colour], SHAPES[obj.shape]
            for text in record.captions_in("en"):
                assert colour.en in text and shape.en in text
            for text in record.captions_in("ko"):
                assert any(form in text for form in colour.ko_attributive), text
                assert any(name in text for name in (shape.ko, *shape.ko_alternatives)), text
        if scene.layout == "count":
            for text in record.captions_in("ko"):
                assert count_phrase(len(scene.objects)) in text
        if scene.layout == "pair":
            a, b = scene.objects
            axis = 0 if scene.relation in ("left", "right") else 1
            first_smaller = (a.x, a.y)[axis] < (b.x, b.y)[axis]
            assert first_smaller == (scene.relation in ("left", "above"))


def test_labelled_single_objects_for_zero_shot() -> None:
    names = list(class_names("shape", "en"))
    for record in generate("scenes", 30, seed=0, image_size=SIZE, label_by="shape", workers=1):
        scene = SceneSpec.from_dict(record.meta["scene"])
        assert scene.layout == "single"
        assert names[record.label] == record.label_name == scene.objects[0].shape
    with pytest.raises(ValueError, match="label_by"):
        generate("scenes", 2, label_by="size")


# ------------------------------------------------------------------ VQA truth
def _expected_answer(scene: SceneSpec, question: str) -> str | None:
    """Answer an English question from the spec, independently of the generator's code."""
    objects = scene.objects
    plural = {s.en_plural: name for name, s in SHAPES.items()}
    singular = {s.en: name for name, s in SHAPES.items()}
    colours = {c.en: name for name, c in COLOURS.items()}
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o.shape == plural[m[1]] for o in objects))
    if question == "How many shapes are there in the image?":
        return str(len(objects))
    if question == "What colour is the background?":
        return COLOURS[scene.background.colour].en
    if m := re.fullmatch(r"What colour (?:is|are) the (\w+)\?", question):
        shape = singular.get(m[1]) or plural[m[1]]
        return COLOURS[next(o.colour for o in objects if o.shape == shape)].en
    if m := re.fullmatch(r"What shape (?:is|are) the (\w+) objects?\?", question):
        return SHAPES[next(o.shape for o in objects if o.colour == colours[m[1]])].en
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        present = (colours[m[1]], singular[m[2]]) in scene.combos
        return "yes" if present else "no"
    if question.startswith("Where is the") and scene.layout == "single":
        return scene.region
    if re.fullmatch(r"Is the \w+ small or large\?", question):
        return objects[0].size
    truth = _relation_truth(scene)
    if question.startswith("Where is the"):
        return truth
    if m := re.fullmatch(r"Is the \w+ \w+ (to the left of|to the right of|above|below) the .*",
                         question):
        word = {"to the left of": "left", "to the right of": "right"}.get(m[1], m[1])
        return "yes" if word == truth else "no"
    return None


def _relation_truth(scene: SceneSpec) -> str:
    a, b = scene.objects[0], scene.objects[-1]
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def _particle_ok(word: str, particle: str) -> bool:
    """Reference particle rule from the NFD jamo of the last syllable."""
    jamo = unicodedata.normalize("NFD", word[-1])
    final = len(jamo) == 3
    return {"이": final, "가": not final, "은": final, "는": not final}[particle]


def _expected_answer_ko(scene: SceneSpec, question: str) -> str | None:
    """Answer a Korean question from the spec; also checks the particle after each noun."""
    objects = scene.objects
    shapes = {s.ko: name for name, s in SHAPES.items()}
    colours = {c.ko_attributive[0]: name for name, c in COLOURS.items()}
    regions = {"left": "왼쪽", "right": "오른쪽", "top": "위쪽", "bottom": "아래쪽",
               "centre": "가운데"}
    relations = {"left": "왼쪽", "right": "오른쪽", "above": "위", "below": "아래"}
    if question == "그림에 도형이 모두 몇 개 있나요?":
        return count_phrase(len(objects))
    if question == "배경은 무슨 색인가요?":
        return COLOURS[scene.background.colour].ko
    if m := re.fullmatch(r"(\S+) 도형은 어떤 모양인가요\?", question):
        return SHAPES[next(o.shape for o in objects if o.colour == colours[m[1]])].ko
    if m := re.fullmatch(r"(\S+) (\S+)(이|가) (\S+) (\S+)의 (\S+)에 있나요\?", question):
        assert _particle_ok(m[2], m[3]), question
        return "예" if relations[_relation_truth(scene)] == m[6] else "아니요"
    if m := re.fullmatch(r"(\S+) (\S+)(은|는) (\S+) (\S+)의 어느 쪽에 있나요\?", question):
        assert _particle_ok(m[2], m[3]), question
        return relations[_relation_truth(scene)]
    if m := re.fullmatch(r"(\S+)(이|가) 몇 개 있나요\?", question):
        assert _particle_ok(m[1], m[2]), question
        return count_phrase(sum(o.shape == shapes[m[1]] for o in objects))
    if m := re.fullmatch(r"(\S+)(은|는) 무슨 색인가요\?", question):
        assert _particle_ok(m[1], m[2]), question
        return COLOURS[next(o.colour for o in objects if o.shape == shapes[m[1]])].ko
    if m := re.fullmatch(r"(\S+) (\S+)(이|가) 있나요\?", question):
        assert _particle_ok(m[2], m[3]), question
        return "예" if (colours[m[1]], shapes[m[2]]) in scene.combos else "아니요"
    if m := re.fullmatch(r"(\S+)(은|는) 그림의 어디에 있나요\?", question):
        assert _particle_ok(m[1], m[2]), question
        return regions[scene.region]
    if m := re.fullmatch(r"(\S+)(은|는) 작나요, 크나요\?", question):
        assert _particle_ok(m[1], m[2]), question
        return "작아요" if objects[0].size == "small" else "커요"
    return None


def test_vqa_answers_match_the_scene() -> None:
    checked = {"en": 0, "ko": 0}
    for record in generate("vqa", 300, seed=7, image_size=SIZE, workers=1):
        scene = SceneSpec.from_dict(record.meta["scene"])
        turns = record.conversation
        lang = record.meta["lang"]
        assert turns[0].content.startswith("<image>\n")
        assert [t.role for t in turns] == ["user", "assistant"] * (len(turns) // 2)
        for user, answer in zip(turns[::2], turns[1::2], strict=True):
            question = user.content.removeprefix("<image>\n")
            answer_from = _expected_answer if lang == "en" else _expected_answer_ko
            expected = answer_from(scene, question)
            assert expected is not None, f"unrecognised question {question!r}"
            assert answer.content == expected, (question, scene)
            checked[lang] += 1
    assert min(checked.values()) > 300


# ------------------------------------------------------------------ defects
def test_defect_masks_exactly_when_defective() -> None:
    labels = []
    for record in generate("defects", 60, seed=0, image_size=SIZE, workers=1):
        mask = np.asarray(Image.open(io.BytesIO(record.mask)))
        image = Image.open(io.BytesIO(record.image))
        assert mask.shape == (image.height, image.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.any()) == (record.label == 1)
        assert (record.label_name == "normal") == (record.label == 0)
        if record.label:
            box = record.boxes[0]
            ys, xs = np.nonzero(mask)
            assert (box.x0, box.y0, box.x1, box.y1) == (xs.min(), ys.min(), xs.max() + 1,
                                                        ys.max() + 1)
            assert record.label_name in record.captions_in("en")[0]  # scratch(ed), stain(ed)...
        labels.append(record.label)
    assert 10 < sum(labels) < 50


# ------------------------------------------------------------------ rendered text
def test_text_records_read_their_own_text() -> None:
    if not find_hangul_fonts():
        pytest.skip("no Hangul font installed (apt-get install fonts-nanum)")
    for record in generate("text", 20, seed=0, image_size=96, workers=1):
        text = record.meta["text"]
        assert record.conversation[1].content == text  # the OCR question comes first
        assert all(text in c.text for c in record.captions)
        box = record.boxes[0]
        assert 0 <= box.x0 < box.x1 <= 96 and 0 <= box.y0 < box.y1 <= 96
    font = str(find_hangul_fonts()[0])
    images = [np.asarray(text_render.render_text_image(word, 96, np.random.default_rng(0),
                                                       font_path=font)[0])
              for word in ("출구", "입구")]
    assert (images[0] != images[1]).any()  # real glyphs, not identical missing-glyph boxes


def test_missing_font_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(text_render, "find_hangul_fonts", lambda: ())
    with pytest.raises(text_render.FontNotFoundError, match="apt-get install fonts-nanum"):
        text_render.hangul_fonts()


# ------------------------------------------------------------------ shards
def test_shards_readable_with_webdataset_and_tarfile(tmp_path) -> None:
    wds = pytest.importorskip("webdataset")
    records = list(generate("defects", 25, seed=1, image_size=SIZE, workers=1))
    manifest = write_shards(SynthSpec("defects", 25, seed=1, image_size=SIZE), tmp_path,
                            shard_size=10, workers=1)
    assert manifest["count"] == 25 and [s["count"] for s in manifest["shards"]] == [10, 10, 5]
    assert manifest["license"] == "generated, CC0" and manifest["seed"] == 1
    assert sum(manifest["counts"]["label_name"].values()) == 25
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == [f"{records[0].key}.png", f"{records[0].key}.json",
                         f"{records[0].key}.mask.png"]

    urls = [str(tmp_path / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [r.key for r in records]
    for sample, record in zip(samples, records, strict=True):
        back = Record.from_json(sample["__key__"], json.loads(sample["json"]),
                                image=sample["png"], mask=sample["mask.png"])
        assert back == record


def test_shards_readable_by_the_general_reader(tmp_path) -> None:
    formats = pytest.importorskip("imagefm.data.formats")
    if not hasattr(formats, "read_shards"):
        pytest.skip("imagefm.data.formats has no read_shards yet")
    write_shards(SynthSpec("vqa", 12, seed=2, image_size=SIZE), tmp_path, shard_size=5,
                 workers=1)
    expected = list(generate("vqa", 12, seed=2, image_size=SIZE, workers=1))
    assert list(formats.read_shards(tmp_path)) == expected


def test_cli_writes_shards(tmp_path) -> None:
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    from imagefm.cli.synth import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "vqa"
    result = CliRunner().invoke(app, ["synth", "vqa", "--n", "12", "--out", str(out),
                                      "--image-size", "32", "--workers", "1", "--split", "eval"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["split"] == "eval"
    bad = CliRunner().invoke(app, ["synth", "scenes", "--n", "2", "--out", str(tmp_path / "x"),
                                   "--held-out", "red"])
    assert bad.exit_code != 0
    labelled = CliRunner().invoke(app, ["synth", "scenes", "--n", "6", "--out",
                                        str(tmp_path / "y"), "--image-size", "32",
                                        "--label-by", "colour", "--workers", "1"])
    assert labelled.exit_code == 0, labelled.output
    manifest = json.loads((tmp_path / "y" / "manifest.json").read_text())
    assert manifest["options"] == {"label_by": "colour"}
    assert sum(manifest["counts"]["label_name"].values()) == 6


def test_benchmark_reports_speed() -> None:
    result = benchmark("scenes", 8, image_size=SIZE)
    assert result["n"] == 8 and result["images_per_s"] > 0


def test_minimal_pair_groups_differ_in_one_attribute_only() -> None:
    from imagefm.data.synthetic import generate

    records = list(generate("pairs", 160, seed=3, workers=1, group_size=4, mixed=0.0))
    varied = {"shape": 0, "colour": 0}
    for g in range(0, len(records), 4):
        scenes = [r.meta["scene"] for r in records[g:g + 4]]
        assert len({r.meta["group"] for r in records[g:g + 4]}) == 1
        objects = [s["objects"][0] for s in scenes]
        # Everything but the object's shape or colour is shared inside a group...
        for key in ("background", "region", "detail_seed", "layout"):
            assert len({str(s[key]) for s in scenes}) == 1, key
        for key in ("size", "texture", "x", "y"):
            assert len({o[key] for o in objects}) == 1, key
        shapes, colours = {o["shape"] for o in objects}, {o["colour"] for o in objects}
        # ...and exactly one of shape / colour varies.
        assert (len(shapes) == 1) != (len(colours) == 1)
        varied["shape" if len(shapes) > 1 else "colour"] += 1
        assert all(o["colour"] != scenes[0]["background"]["colour"] for o in objects)
    assert min(varied.values()) > 5  # both kinds of group occur


def test_minimal_pairs_respect_held_out_and_mix_layouts() -> None:
    from imagefm.data.synthetic import DEFAULT_HELD_OUT, generate

    records = list(generate("pairs", 400, seed=4, workers=1, mixed=0.3))
    combos = {(o["colour"], o["shape"]) for r in records for o in r.meta["scene"]["objects"]}
    assert not combos & set(DEFAULT_HELD_OUT)
    layouts = {r.meta["scene"]["layout"] for r in records}
    assert layouts == {"single", "count", "pair"}


def test_scene_style_restricts_looks_and_removes_jitter() -> None:
    from imagefm.data.synthetic.scenes import REGION_CENTRES

    style = {"textures": ["solid"], "backgrounds": ["plain"],
             "background_colours": ["white", "grey", "black"], "jitter": 0.0}
    records = list(generate("scenes", 60, seed=3, workers=1, style=style, captions_per_lang=1))
    for record in records:
        scene = record.meta["scene"]
        assert scene["background"]["kind"] == "plain"
        assert {o["texture"] for o in scene["objects"]} == {"solid"}
        objects = {o["colour"] for o in scene["objects"]}
        allowed = {"white", "grey", "black"} - objects
        # only when every neutral colour is taken by an object may another one appear
        assert scene["background"]["colour"] in (allowed or {scene["background"]["colour"]})
        if scene["layout"] == "single":
            obj = scene["objects"][0]
            assert (obj["x"], obj["y"]) == REGION_CENTRES[scene["region"]]
    varied = list(generate("scenes", 60, seed=3, workers=1, layouts=("single",),
                           captions_per_lang=1))
    offsets = [abs(r.meta["scene"]["objects"][0]["x"]
                   - REGION_CENTRES[r.meta["scene"]["region"]][0]) for r in varied]
    assert 0 < max(offsets) <= 0.05
    with pytest.raises(ValueError, match="unknown scene style keys"):
        list(generate("pairs", 2, workers=1, style={"texture": ["solid"]}))
    with pytest.raises(ValueError, match="jitter"):
        list(generate("scenes", 2, workers=1, style={"jitter": 0.5}))
