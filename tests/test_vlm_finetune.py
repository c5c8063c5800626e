"""Fine-tuning VLMs on your own conversation files (``data.source = conversations``).

A tiny random Qwen2-VL (transformers, built with tests/test_qwen2_vl.py's tokenizer and chat
template) is LoRA-tuned through the real Trainer on a conversation file written here: LLaVA JSON
and OpenAI JSONL, English and Korean, several images per conversation, COCO photos and odd-sized
synthetic pictures, a data: URL, a missing and a corrupt image. Checked: the loss falls, only the
LoRA tensors change and only they reach the optimizer, labels sit on the replies alone (decoded),
the run checkpoint rebuilt unmerged gives the merged model's logits, the merged model exports to
transformers. The LLaVA-style VLM and LLaVA-OneVision train from the same file.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from conftest import SHARED_DATA  # noqa: E402
from test_qwen2_vl import _reference_processor, _tokenizer, tiny_qwen2_vl  # noqa: E402

import imagefm  # noqa: E402
from imagefm.config import ConfigError  # noqa: E402
from imagefm.data.conversations import ConversationFileError, read_conversations  # noqa: E402
from imagefm.models.decoder import IGNORE_INDEX  # noqa: E402
from imagefm.train.config import load_config  # noqa: E402
from imagefm.train.conversations import ConversationBatches, codec_for  # noqa: E402
from imagefm.train.launch import model_from_checkpoint, run  # noqa: E402
from imagefm.train.metrics import read_metrics  # noqa: E402
from imagefm.train.stages import apply_stage, is_lora_parameter  # noqa: E402

LORA_TARGETS = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
KOREAN_REPLIES = ["고양이 사진입니다.", "빨간색이에요."]


def _picture(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    noise = rng.integers(-30, 30, (height, width, 3))
    return Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8))


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(LLaVA .json, OpenAI .jsonl, image folder): 8 usable conversations, 1 corrupt image,
    1 missing image."""
    root = tmp_path_factory.mktemp("chats")
    images = root / "images"
    images.mkdir()
    photos = sorted((SHARED_DATA / "coco-mini" / "train2017").glob("*.jpg"))[:3]
    for index in range(3):  # real photos when the shared data is there
        picture = (Image.open(photos[index]).convert("RGB") if len(photos) == 3
                   else _picture(120 + 10 * index, 90, index))
        picture.save(images / f"photo{index}.jpg")
    for name, (height, width, seed) in {"wide": (45, 71, 1), "tall": (97, 33, 2),
                                        "tiny": (9, 12, 3)}.items():
        _picture(height, width, seed).save(images / f"{name}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    llava = [
        {"id": "photo", "image": "photo0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A photo of a street."}]},
        {"id": "two", "image": ["wide.png", "tall.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDescribe both images."},
            {"from": "gpt", "value": "A wide one and a tall one."}]},
        {"id": "korean", "image": "photo1.jpg", "conversations": [
            {"from": "human", "value": "<image>\n이 사진에 무엇이 있나요?"},
            {"from": "gpt", "value": KOREAN_REPLIES[0]},
            {"from": "human", "value": "무슨 색이에요?"},
            {"from": "gpt", "value": KOREAN_REPLIES[1]}]},
        {"id": "no-placeholder", "image": "tiny.png", "conversations": [
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Green, mostly."}]},
        {"id": "corrupt", "image": "broken.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "?"}]},
    ]
    (root / "llava.json").write_text(json.dumps(llava, ensure_ascii=False, indent=1),
                                     encoding="utf-8")
    openai = [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(_picture(50, 39, 4))}},
            {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": "A small square."}]},
        {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": [
                          {"type": "text", "text": "고양이?"},
                          {"type": "image_url", "image_url": {"url": "photo2.jpg"}}]},
                      {"role": "assistant", "content": "네, 고양이입니다."}]},
        {"messages": [{"role": "user", "content": "Say hello."},
                      {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": (images / "wide.png").as_uri()}},
            {"type": "text", "text": "Is it wide?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes, it is wide."}]}]},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "nowhere.jpg"}},
            {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "Nothing."}]},
    ]
    lines = "\n".join(json.dumps(entry, ensure_ascii=False) for entry in openai)
    (root / "openai.jsonl").write_text(lines + "\n", encoding="utf-8")
    return root / "llava.json", root / "openai.jsonl", images


def _data_overrides(files: tuple[Path, Path, Path]) -> list[str]:
    llava, openai, images = files
    return ["data.source=conversations", f"data.path={llava}",
            f"data.options={{paths: ['{openai}'], images: '{images}', length_group: 2}}"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL saved by transformers, with weights larger than HF's
    initialisation (as tests/test_qwen2_vl.py's): logits that vary, for LoRA to steer."""
    tokenizer = _tokenizer()
    model = tiny_qwen2_vl(tokenizer)
    directory = tmp_path_factory.mktemp("qwen2_vl")
    model.save_pretrained(directory)
    _reference_processor(tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def lora_run(qwen_dir: Path, chat_files, tmp_path_factory) -> Path:
    """30 LoRA steps (bf16 autocast) through the real Trainer; the run folder."""
    output = tmp_path_factory.mktemp("runs")
    return run(load_config(None, [
        f"model.init={qwen_dir}", "task.name=vlm", *_data_overrides(chat_files),
        "data.batch_size=4", "train.steps=30", "train.precision=bf16", "optim.lr=5e-3",
        "optim.warmup_steps=3", "optim.weight_decay=0", "stage.preset=lora", "stage.lora_rank=8",
        f"stage.lora_targets={LORA_TARGETS}", "run.checkpoint_every=30", "run.name=qwen-lora",
        f"run.output_dir={output}", "run.progress=false", "run.tensorboard=false"]))


def _batch(model, chat_files) -> dict[str, torch.Tensor]:
    """The first batch of the conversations for ``model`` (images of several sizes)."""
    llava, openai, images = chat_files
    conversations = read_conversations(llava, images) + read_conversations(openai, images)
    return next(iter(ConversationBatches(codec_for(model), conversations, batch_size=4)(0)))


def test_lora_run_loss_falls(lora_run: Path) -> None:
    losses = [r["loss"] for r in read_metrics(lora_run / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, (first, last)


def test_lora_run_changes_lora_weights_only(lora_run: Path, qwen_dir: Path) -> None:
    start = imagefm.load(qwen_dir).state_dict()
    checkpoint = torch.load(lora_run / "checkpoints" / "step_00000030.pt", weights_only=True)
    state = checkpoint["model"]
    lora = {k: v for k, v in state.items() if is_lora_parameter(k)}
    base = {k.replace(".base_layer.", "."): v for k, v in state.items()
            if not is_lora_parameter(k)}
    assert set(base) == set(start)
    assert all(torch.equal(base[k], start[k]) for k in start)  # every base weight bit-identical
    # LoRA sits on the decoder's seven projections only, and its B matrices (zero at the start)
    # have all moved.
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"}
    assert all(k.startswith("lm.") for k in lora)
    assert all(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)
    # Only the LoRA tensors reached the optimizer.
    names = [n for group in checkpoint["optimizer"]["param_groups"] for n in group["names"]]
    assert sorted(names) == sorted(lora)


def test_merged_and_unmerged_models_agree(lora_run: Path, chat_files) -> None:
    from imagefm.train.stages import merge_lora

    checkpoint = lora_run / "checkpoints" / "step_00000030.pt"
    unmerged = model_from_checkpoint(checkpoint, merge=False)
    assert any(is_lora_parameter(n) for n, _ in unmerged.named_parameters())
    merged = imagefm.load(lora_run / "final")  # the Trainer's export: LoRA folded in
    assert not any(is_lora_parameter(n) for n in merged.state_dict())
    # The run checkpoint merged again is the exported model, bit for bit.
    remerged = model_from_checkpoint(checkpoint).state_dict()
    assert set(remerged) == set(merged.state_dict())
    assert all(torch.equal(remerged[k], v) for k, v in merged.state_dict().items())
    batch = _batch(merged, chat_files)
    batch.pop("labels")
    grids = batch["image_grid_thw"].tolist()
    assert len(grids) >= 3 and len(set(map(tuple, grids))) >= 2  # several images and sizes
    with torch.no_grad():
        expected = merged(**batch).logits
        # fp32: W x + s B A x against (W + s B A) x, each rounded its own way: within 1e-5 of
        # the largest logit (these large random weights give logits up to about 7, and the
        # largest difference is about 2e-5).
        difference = (unmerged(**batch).logits - expected).abs().max()
        assert difference <= 1e-5 * expected.abs().max(), difference
        # fp64: the merge itself is exact.
        unmerged.double()
        wide = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        before = unmerged(**wide).logits
        assert merge_lora(unmerged)
        after = unmerged(**wide).logits
        torch.testing.assert_close(after, before, atol=1e-10, rtol=0)


def test_merged_model_exports_to_transformers(lora_run: Path, chat_files, tmp_path: Path) -> None:
    from imagefm.convert import qwen2_vl

    export = getattr(qwen2_vl, "export_qwen2_vl", None)
    if export is None:
        pytest.skip("imagefm.convert.qwen2_vl.export_qwen2_vl does not exist yet (HF export is "
                    "another part of issue 15)")
    merged = imagefm.load(lora_run / "final")
    export(merged, tmp_path / "hf")
    reference = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    batch = _batch(merged, chat_files)
    batch.pop("labels")
    image_tokens = batch["input_ids"] == merged.config.image_token_id
    with torch.no_grad():
        ours = merged(**batch).logits
        theirs = reference.eval()(**batch, mm_token_type_ids=image_tokens.long()).logits
    real = batch["attention_mask"].bool()  # right padding: compare the real positions
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=1e-4)


def test_labels_cover_the_replies_only(qwen_dir: Path, chat_files) -> None:
    llava, _, images = chat_files
    model = imagefm.load(qwen_dir)
    codec = codec_for(model)
    korean = next(c for c in read_conversations(llava, images) if "무슨" in str(c.messages))
    photo = Image.open(korean.images[0])
    example = codec.example(korean, [(photo.height, photo.width)])
    ids, labels = torch.tensor(example.input_ids), torch.tensor(example.labels)
    # The ids are those the reference processor gives the whole rendered conversation.
    hf = transformers.AutoProcessor.from_pretrained(qwen_dir)
    messages = [{**m, "content": [p if p["type"] == "text" else {"type": "image"}
                                  for p in m["content"]]} for m in korean.messages]
    text = hf.apply_chat_template(messages, tokenize=False)
    reference = hf(text=[text], images=[photo.convert("RGB")], return_tensors="pt")
    assert torch.equal(ids, reference["input_ids"][0])
    # Labelled runs decode to the two replies, each with its end-of-turn marker.
    labelled = (labels != IGNORE_INDEX).int()
    starts = torch.nonzero(torch.diff(labelled, prepend=torch.tensor([0])) == 1).flatten()
    ends = torch.nonzero(torch.diff(labelled, append=torch.tensor([0])) == -1).flatten() + 1
    tokenizer = hf.tokenizer
    spans = [tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in
             zip(starts.tolist(), ends.tolist(), strict=True)]
    assert spans == [f"{reply}<|im_end|>" for reply in KOREAN_REPLIES]
    assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    assert (labels[ids == model.config.image_token_id] == IGNORE_INDEX).all()
    assert int((ids == model.config.image_token_id).sum()) > 0


def test_missing_and_corrupt_images_are_counted_and_skipped(qwen_dir: Path, chat_files) -> None:
    llava, openai, images = chat_files
    conversations = read_conversations(llava, images) + read_conversations(openai, images)
    assert len(conversations) == 10
    source = ConversationBatches(codec_for(imagefm.load(qwen_dir)), conversations, batch_size=4)
    assert len(source.items) == 8
    assert source.skips.skipped == {"corrupt image": 1, "missing image": 1}
    assert "broken.jpg" in source.skips.report() and "nowhere.jpg" in source.skips.report()
    # Length grouping: deterministic per epoch, a new order each epoch, every batch full.
    plans = [source.plan(0), source.plan(0), source.plan(1)]
    assert plans[0] == plans[1] != plans[2]
    assert all(len(b) == 4 for b in plans[0]) and len(plans[0]) == 2


def test_a_bad_file_is_refused_naming_its_line(qwen_dir: Path, chat_files,
                                               tmp_path: Path) -> None:
    llava, openai, images = chat_files
    bad = tmp_path / "bad.jsonl"
    good = openai.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([good[0], good[1], '{"messages": [{"role": "user"'] + good[2:]),
                   encoding="utf-8")
    with pytest.raises(ConversationFileError, match=rf"{bad.name}:3: not valid JSON"):
        read_conversations(bad)
    wrong = tmp_path / "wrong.json"
    entries = json.loads(llava.read_text(encoding="utf-8"))
    entries[1]["image"] = ["wide.png"]  # two placeholders, one image
    wrong.write_text(json.dumps(entries, indent=1), encoding="utf-8")
    with pytest.raises(ConversationFileError, match=r"wrong.json:\d+: 2 <image> placeholder"):
        read_conversations(wrong, images)
    # Through the Trainer: refused before anything is written.
    with pytest.raises(ConfigError, match=r"bad.jsonl:3:"):
        run(load_config(None, [f"model.init={qwen_dir}", "task.name=vlm",
                               "data.source=conversations", f"data.path={bad}",
                               f"run.output_dir={tmp_path / 'runs'}", "run.progress=false"]))
    assert not (tmp_path / "runs").exists()


def test_qwen_stage_presets_name_the_merger_as_projector(qwen_dir: Path) -> None:
    from imagefm.train.config import StageConfig

    def trainable(preset: str, **options) -> set[str]:
        model = imagefm.load(qwen_dir)
        apply_stage(model, StageConfig(preset=preset, **options))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    every = {n for n, _ in imagefm.load(qwen_dir).named_parameters()}
    assert trainable("full") == every
    assert trainable("align") == {n for n in every if n.startswith("vision.merger.")}
    assert trainable("sft") == {n for n in every if n.startswith(("vision.merger.", "lm."))}
    lora = trainable("lora", lora_rank=4)
    assert lora and all(is_lora_parameter(n) and n.startswith("lm.") for n in lora)
    with pytest.raises(ConfigError, match="stage.lora_rank"):
        load_config(None, [f"model.init={qwen_dir}", "task.name=vlm", "stage.preset=lora"])


def test_llava_style_vlm_trains_on_the_same_file(tiny_vlm, chat_files, tmp_path: Path) -> None:
    tiny_vlm.save_pretrained(tmp_path / "init")
    start = imagefm.load(tmp_path / "init").state_dict()
    folder = run(load_config(None, [
        f"model.init={tmp_path / 'init'}", "task.name=vlm", *_data_overrides(chat_files),
        "data.batch_size=4", "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-2",
        "stage.preset=sft", f"run.output_dir={tmp_path}", "run.name=llava",
        "run.progress=false", "run.tensorboard=false"]))
    state = imagefm.load(folder / "final").state_dict()
    changed = {k.split(".")[0] for k in state if not torch.equal(state[k], start[k])}
    assert changed == {"projector", "lm"}  # sft: the vision tower stays frozen
    # Its template takes text: images are written as <image>, each 4 placeholder ids.
    batch = _batch(tiny_vlm, chat_files)
    image_id = tiny_vlm.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == 4 * batch["pixel_values"].shape[0]
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()


def test_llava_onevision_trains_on_the_same_file(chat_files, tmp_path: Path) -> None:
    if not hasattr(transformers, "LlavaOnevisionImageProcessorPil"):
        pytest.skip("the reference is built with transformers 5")
    from test_llava_onevision import ASPECT, PINPOINTS, TILE
    from test_llava_onevision import SPECIALS as OV_SPECIALS
    from test_llava_onevision import _reference_processor as ov_processor
    from test_llava_onevision import _tokenizer as ov_tokenizer

    tokenizer = ov_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in OV_SPECIALS}
    config = transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                           image_size=TILE, vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=48, intermediate_size=72,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=ASPECT,
        vision_feature_select_strategy="full")
    transformers.LlavaOnevisionForConditionalGeneration(config).save_pretrained(tmp_path / "ov")
    ov_processor(tokenizer).save_pretrained(tmp_path / "ov")
    model = imagefm.load(tmp_path / "ov")
    # Its template opens an assistant turn with "assistant \n" but prompts with "assistant\n":
    # the labels still cover exactly the replies.
    batch = _batch(model, chat_files)
    labelled = batch["input_ids"][batch["labels"] != IGNORE_INDEX]
    assert int((labelled == ids["<|im_end|>"]).sum()) >= 4  # every reply ends with its marker
    assert not bool(((labelled == ids["<image>"]) | (labelled == ids["<|im_start|>"])).any())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    folder = run(load_config(None, [
        f"model.init={tmp_path / 'ov'}", "task.name=vlm", *_data_overrides(chat_files),
        "data.batch_size=4", "train.steps=2", "optim.warmup_steps=1", "stage.preset=align",
        f"run.output_dir={tmp_path}", "run.name=ov", "run.progress=false",
        "run.tensorboard=false"]))
    state = imagefm.load(folder / "final").state_dict()
    changed = {k.split(".")[0] for k in state if not torch.equal(state[k], start[k])}
    assert changed == {"projector", "image_newline"}  # align: the projector's part only


def test_smolvlm_trains_on_the_same_file(chat_files, tmp_path: Path) -> None:
    pytest.importorskip("imagefm.models.idefics3")
    from test_idefics3 import _build

    reference, processor = _build(tmp_path / "smolvlm", "smolvlm")
    model = imagefm.load(tmp_path / "smolvlm")
    llava, _, images = chat_files
    korean = next(c for c in read_conversations(llava, images) if "무슨" in str(c.messages))
    photo = Image.open(korean.images[0]).convert("RGB")
    example = codec_for(model).example(korean, [(photo.height, photo.width)])
    # The ids are the reference processor's for the whole conversation (BOS written by the
    # template, tiles + global view expanded); the labels are the replies with their markers.
    messages = [{**m, "content": [p if p["type"] == "text" else {"type": "image"}
                                  for p in m["content"]]} for m in korean.messages]
    text = processor.apply_chat_template(messages, tokenize=False)
    expected = processor(text=[text], images=[[photo]], return_tensors="pt")["input_ids"][0]
    assert example.input_ids == expected.tolist()
    labelled = [i for i, label in zip(example.input_ids, example.labels, strict=True)
                if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(labelled) == "".join(
        f" {reply}<end_of_utterance>" for reply in KOREAN_REPLIES)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    folder = run(load_config(None, [
        f"model.init={tmp_path / 'smolvlm'}", "task.name=vlm", *_data_overrides(chat_files),
        "data.batch_size=4", "train.steps=2", "optim.warmup_steps=1", "stage.preset=lora",
        "stage.lora_rank=4", f"run.output_dir={tmp_path}", "run.name=smolvlm",
        "run.progress=false", "run.tensorboard=false"]))
    state = imagefm.load(folder / "final").state_dict()
    changed = {k for k in state if not torch.equal(state[k], start[k])}
    assert changed and all(k.startswith("lm.") and k.rsplit(".", 2)[-2] in (
        "q_proj", "k_proj", "v_proj", "o_proj") for k in changed)  # merged LoRA only
