"""The VLM: projector, image-token contract, processor labels, generation, HF LLaVA parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import imagefm
from imagefm.config import VisionConfig
from imagefm.models.decoder import IGNORE_INDEX
from imagefm.models.projector import Projector, pixel_shuffle
from imagefm.models.vlm import VLM, VLMConfig, compose_vlm
from imagefm.vlm_processor import VLMProcessor

TOWER = VisionConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_dim=64,
                     act="gelu")


def test_pixel_shuffle_groups_square_neighbourhoods() -> None:
    grid = torch.arange(16).float().reshape(1, 16, 1)  # a 4x4 grid, token value = its index
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 4)
    # The first output token holds the top-left 2x2 square: indices 0, 1, 4, 5 (row-major).
    assert out[0, 0].tolist() == [0, 1, 4, 5]
    assert out[0, 3].tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 15, 1), 2)


def test_projector_kinds_and_token_counts() -> None:
    assert Projector("mlp2x_gelu", 32, 48)(torch.zeros(2, 16, 32)).shape == (2, 16, 48)
    assert Projector("pixel_shuffle", 32, 48, factor=2)(torch.zeros(2, 16, 32)).shape == (2, 4, 48)



def test_compose_adds_one_image_token_and_counts_image_tokens(tiny_vlm: VLM) -> None:
    config = tiny_vlm.config
    assert config.image_tokens == 4  # a 4x4 patch grid, merged 2x2
    assert tiny_vlm.tokenizer.token_to_id("<image>") == config.image_token_id
    assert config.image_token_id == config.lm.vocab_size - 1
    assert tiny_vlm.tokenizer.pieces("a <image> b").count(config.image_token_id) == 1


def test_processor_expands_images_and_labels_assistant_turns_only(tiny_vlm: VLM) -> None:
    proc = VLMProcessor.for_model(tiny_vlm)
    messages = [{"role": "user", "content": "<image>\nthe dog?"},
                {"role": "assistant", "content": "a small cat"},
                {"role": "user", "content": "작은?"},
                {"role": "assistant", "content": "작은 고양이"}]
    example = proc.training_example(messages)
    ids, labels = example.input_ids, example.labels
    assert ids.count(tiny_vlm.config.image_token_id) == 4 and example.images == 1
    labelled = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    tokenizer = tiny_vlm.tokenizer
    end = tokenizer.token_to_id("<|im_end|>")
    # Exactly the two replies, each with its end-of-turn marker, and nothing else.
    assert labelled == (tokenizer.pieces("a small cat") + [end] +
                        tokenizer.pieces("작은 고양이") + [end])
    # The ids are the whole conversation as the template renders it.
    text = proc.render(messages, add_generation_prompt=False)
    assert ids == proc.encode(text)


def test_model_refuses_a_wrong_number_of_image_tokens(tiny_vlm: VLM) -> None:
    image_id = tiny_vlm.config.image_token_id
    ids = torch.tensor([[5, image_id, image_id, 6]])
    with pytest.raises(ValueError, match="2 image placeholder tokens but 1 image"):
        tiny_vlm(ids, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_vlm(ids)


def test_image_features_reach_the_logits_and_the_loss_trains(tiny_vlm: VLM) -> None:
    proc = VLMProcessor.for_model(tiny_vlm)
    messages = [{"role": "user", "content": "<image>\nthe dog?"},
                {"role": "assistant", "content": "a small cat"}]
    batch = proc.collate([proc.training_example(messages)] * 2,
                         images=[torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()] * 2)
    batch["pixel_values"][1] = torch.randn(3, 32, 32)
    out = tiny_vlm(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert not torch.allclose(out.logits[0, -1], out.logits[1, -1])  # the image matters
    out.loss.backward()
    assert tiny_vlm.projector.fc1.weight.grad.abs().sum() > 0


def test_generation_with_cache_equals_without_and_batches_with_left_padding(
        tiny_vlm: VLM) -> None:
    proc = VLMProcessor.for_model(tiny_vlm)
    images = [torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8).numpy() for _ in range(2)]
    conversations = [[{"role": "user", "content": "the dog runs?"}],
                     [{"role": "user", "content": "작은"}]]
    batch = proc.prompt(conversations, images)
    cached = tiny_vlm.generate(**batch, max_new_tokens=6, eos_token_id=[])
    uncached = tiny_vlm.generate(**batch, max_new_tokens=6, eos_token_id=[], use_cache=False)
    assert torch.equal(cached, uncached)
    for row in range(2):  # each row of the padded batch generates what it would alone
        alone = proc.prompt(conversations[row:row + 1], images[row:row + 1])
        single = tiny_vlm.generate(**alone, max_new_tokens=6, eos_token_id=[])
        assert torch.equal(single[0, -6:], cached[row, -6:])


def test_imagefm_checkpoint_round_trip(tiny_vlm: VLM, tmp_path: Path) -> None:
    tiny_vlm.save_pretrained(tmp_path / "vlm")
    loaded = imagefm.load(tmp_path / "vlm")
    assert isinstance(loaded, VLM) and loaded.config == tiny_vlm.config
    proc = imagefm.load_processor(tmp_path / "vlm")
    assert isinstance(proc, VLMProcessor)
    batch = proc.prompt([[{"role": "user", "content": "the dog?"}]],
                        [torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, tiny_vlm(**batch).logits)


def test_config_refuses_impossible_settings() -> None:
    from imagefm.config import ConfigError
    from imagefm.models.decoder_config import DecoderConfig

    lm = DecoderConfig(vocab_size=100, width=32, layers=1, heads=4, kv_heads=2, mlp_dim=64)
    with pytest.raises(ConfigError, match="image_token_id"):
        VLMConfig(vision=TOWER, lm=lm, image_token_id=100)
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        VLMConfig(vision=TOWER, lm=lm, image_token_id=5, vision_feature_layer=-5)
    with pytest.raises(ConfigError, match="divisible"):
        VLMConfig(vision=TOWER, lm=lm, image_token_id=5, projector="pixel_shuffle",
                  pixel_shuffle=3)


# --- Hugging Face LLaVA ---------------------------------------------------------------------------

def _tiny_llava(tie: bool) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4,
                                           image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=tie)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_index=100, vision_feature_layer=-2,
                                      image_seq_length=16, tie_word_embeddings=tie)
    return transformers.LlavaForConditionalGeneration(config).eval()


def _relayout(directory: Path, rename: dict[str, str]) -> None:
    """Rewrite the saved weights with other key prefixes (another transformers version's)."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    state = load_file(path)
    renamed = {}
    for key, value in state.items():
        for old, new in rename.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    save_file(renamed, path, metadata={"format": "pt"})


LAYOUTS = {
    "as saved": {},
    "transformers 4.52+": {"vision_tower.": "model.vision_tower.vision_model.",
                           "multi_modal_projector.": "model.multi_modal_projector.",
                           "language_model.model.": "model.language_model.",
                           "language_model.lm_head.": "lm_head."},
    "transformers < 4.52": {"vision_tower.": "vision_tower.vision_model."},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tie", [False, True])
def test_hf_llava_logits_match(tmp_path: Path, layout: str, tie: bool) -> None:
    reference = _tiny_llava(tie)
    reference.save_pretrained(tmp_path)
    _relayout(tmp_path, LAYOUTS[layout])
    ours = imagefm.load(tmp_path)
    assert isinstance(ours, VLM)
    assert ours.config.vision_feature_layer == -2 and ours.config.image_tokens == 16
    ids = torch.tensor([[1, 5, 6] + [100] * 16 + [7, 8, 9], [2, 3] + [100] * 16 + [4, 5, 6, 7]])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels).logits
    assert (expected - got).abs().max() <= 1e-4


def test_hf_llava_greedy_generation_matches(tmp_path: Path) -> None:
    reference = _tiny_llava(False)
    reference.save_pretrained(tmp_path)
    ours = imagefm.load(tmp_path)
    ids = torch.tensor([[1, 5] + [100] * 16 + [7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    expected = reference.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, pixels, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(expected, got)


def test_hf_llava_config_options_carry_over(tmp_path: Path) -> None:
    reference = _tiny_llava(False)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_feature_layer"] = [-2, -1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(imagefm.checkpoint.CheckpointError, match="one layer"):
        imagefm.load(tmp_path)


# --- training and evaluation ----------------------------------------------------------------------

def test_synthetic_conversations_are_deterministic_and_labelled(tiny_vlm: VLM) -> None:
    from imagefm.train.vlm_data import SyntheticConversations

    proc = VLMProcessor.for_model(tiny_vlm)
    source = SyntheticConversations(proc, batch_size=4, kind="mixed", examples_per_epoch=8)
    first, again = list(source(0)), list(source(0))
    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    batch = first[0]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    image_id = tiny_vlm.config.image_token_id
    assert ((batch["input_ids"] == image_id).sum(1) == 4).all()  # one image each, 4 tokens
    assert (batch["labels"][batch["input_ids"] == image_id] == IGNORE_INDEX).all()
    assert not torch.equal(list(source(1))[0]["input_ids"], batch["input_ids"])
    # Two ranks split the same global batch.
    halves = [list(SyntheticConversations(proc, batch_size=4, examples_per_epoch=8, rank=r,
                                          world_size=2)(0))[0] for r in (0, 1)]
    assert torch.equal(halves[0]["pixel_values"], batch["pixel_values"][:2])
    assert torch.equal(halves[1]["pixel_values"], batch["pixel_values"][2:])


def test_vlm_stages_train_with_the_shared_trainer(tiny_vlm: VLM, tmp_path: Path) -> None:
    from imagefm.train.config import load_config
    from imagefm.train.launch import run

    tiny_vlm.save_pretrained(tmp_path / "init")
    before = imagefm.load(tmp_path / "init")
    common = [f"model.init={tmp_path / 'init'}", "task.name=vlm", "data.source=vlm-synthetic",
              "data.batch_size=4", "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-2",
              f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false"]
    align = run(load_config(None, [*common, "stage.preset=align", "run.name=align",
                                   "data.options={kind: captions}"]))
    aligned = imagefm.load(align / "final")
    state, start = aligned.state_dict(), before.state_dict()
    changed = {k.split(".")[0] for k in state if not torch.equal(state[k], start[k])}
    assert changed == {"projector"}  # align: vision tower and LM frozen
    sft = run(load_config(None, [*common, "stage.preset=sft", "run.name=sft",
                                 f"model.init={align / 'final'}"]))
    tuned = imagefm.load(sft / "final")
    state = tuned.state_dict()
    changed = {k.split(".")[0] for k in state if not torch.equal(state[k], aligned.state_dict()[k])}
    assert changed == {"projector", "lm"}  # sft: the vision tower stays frozen
    assert tuned.tokenizer.token_to_id("<image>") == tuned.config.image_token_id


def test_vlm_task_is_refused_for_the_wrong_model(tmp_path: Path) -> None:
    from imagefm.config import ConfigError
    from imagefm.train.config import load_config

    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["task.name=vlm"])


def test_vqa_exact_match_normalises_case_space_and_punctuation() -> None:
    from imagefm.eval.vqa import VQAResult, normalize_answer

    assert normalize_answer(" Red.") == "red"
    assert normalize_answer("빨간색입니다.") != normalize_answer("빨간색")
    result = VQAResult("all")
    result.add("en", "colour", "q", "red", "Red.")
    result.add("ko", "count", "q", "두 개", "세 개")
    assert result.accuracy == 0.5
    assert result.to_dict()["by_lang"] == {"en": {"accuracy": 1.0, "n": 1},
                                          "ko": {"accuracy": 0.0, "n": 1}}


def test_vlm_init_and_eval_commands(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app
    from imagefm.config import preset
    from imagefm.models.dual_encoder import DualEncoder

    tower = preset("tiny").replace(vision=TOWER)
    DualEncoder(tower).save_pretrained(tmp_path / "clip")
    runner = CliRunner()
    result = runner.invoke(app, ["vlm-init", "--vision", str(tmp_path / "clip"), "--lm",
                                 str(tiny_llama_dir), "--out", str(tmp_path / "vlm"),
                                 "--projector", "pixel_shuffle", "--pixel-shuffle", "2"])
    assert result.exit_code == 0, result.output
    assert "4 LM tokens per image" in result.output
    result = runner.invoke(app, ["vlm-eval", str(tmp_path / "vlm"), "--questions", "3",
                                 "--splits", "all", "--captions", "0", "--no-blind",
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert report["vqa"][0]["n"] == 6  # 3 questions in each of en and ko
    assert "| all | ko |" in (tmp_path / "eval" / "report.md").read_text()
    result = runner.invoke(app, ["vlm-eval", str(tmp_path / "clip")])
    assert result.exit_code != 0 and "not a VLM" in result.output


def test_record_conversations_from_shards_and_llava_json(tiny_vlm: VLM, tmp_path: Path) -> None:
    from PIL import Image

    from imagefm.data.files import write_llava_json
    from imagefm.data.formats import write_shards
    from imagefm.data.records import Caption, Record, Turn
    from imagefm.data.synthetic.drawing import encode_png
    from imagefm.train.vlm_data import RecordConversations, read_training_records

    def picture(value: int) -> bytes:
        return encode_png(Image.new("RGB", (40, 40), (value, 0, 0)))

    captioned = [Record(f"cap{i}", picture(i), captions=[Caption("a small cat", "en"),
                                                          Caption("작은 고양이", "ko")])
                 for i in range(3)]
    reserved = Record("lion", picture(9), captions=[Caption("lion", "en")], split="test")
    broken = Record("broken", b"not an image", captions=[Caption("the dog", "en")])
    talk = Record("talk", picture(7), conversation=[Turn("user", "the dog?"),
                                                   Turn("assistant", "the dog runs")])
    write_shards([*captioned, reserved, broken], tmp_path / "shards")
    write_llava_json([talk], tmp_path / "talk.json")
    records = read_training_records([str(tmp_path / "shards"), str(tmp_path / "talk.json")])
    assert sorted(r.key for r in records) == ["broken", "cap0", "cap1", "cap2", "talk"]
    source = RecordConversations(VLMProcessor.for_model(tiny_vlm), records, batch_size=2)
    batches = list(source(0))
    # 3 records x 2 languages + 1 conversation = 7 usable, the broken image skipped: 3 batches.
    assert len(batches) == 3 and source.skipped == 1
    assert all((b["input_ids"] == tiny_vlm.config.image_token_id).sum() == 8 for b in batches)
    assert not torch.equal(list(source(1))[0]["input_ids"], batches[0]["input_ids"])


def test_lora_sft_trains_adapters_only_and_exports_merged_weights(tiny_vlm: VLM,
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from imagefm.train.config import load_config
    from imagefm.train.launch import run

    tiny_vlm.save_pretrained(tmp_path / "init")
    start = imagefm.load(tmp_path / "init").state_dict()
    folder = run(load_config(None, [
        f"model.init={tmp_path / 'init'}", "task.name=vlm", "data.source=vlm-synthetic",
        "data.batch_size=4", "train.steps=3", "optim.warmup_steps=1", "optim.lr=1e-2",
        f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false",
        "run.name=lora", "stage.preset=sft", "stage.lora_rank=4"]))
    tuned = imagefm.load(folder / "final")  # plain names: LoRA was merged at export
    state = tuned.state_dict()
    assert set(state) == set(start)
    changed = {k for k in state if not torch.equal(state[k], start[k])}
    # Only the projector and the attention projections LoRA touched (merged) have moved.
    assert {k.split(".")[0] for k in changed} == {"projector", "lm"}
    lm_changed = {k for k in changed if k.startswith("lm.")}
    assert lm_changed and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")
                              for k in lm_changed)


def test_blind_control_shows_a_grey_picture(tiny_vlm: VLM, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    from imagefm.eval import vqa

    proc = VLMProcessor.for_model(tiny_vlm)
    seen: list[np.ndarray] = []
    original = vqa.answer

    def spy(model, processor, images, questions, **kwargs):  # noqa: ANN001, ANN202
        seen.extend(images)
        return original(model, processor, images, questions, **kwargs)

    monkeypatch.setattr(vqa, "answer", spy)
    result = vqa.evaluate_vqa(tiny_vlm, proc, n=2, langs=("en",), blind=True)
    assert result.split == "all (blind)" and result.total == 2
    assert all((image == 128).all() for image in seen) and len(seen) == 2


def test_an_efficientnet_tower_feeds_the_vlm_one_token_per_feature_cell(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    from imagefm.config import EfficientNetLiteConfig
    from imagefm.models.efficientnet import EfficientNetLite

    tower = EfficientNetLite(EfficientNetLiteConfig(image_size=64)).eval()
    vlm = compose_vlm(tower, imagefm.load(tiny_llama_dir)).eval()
    assert vlm.config.image_tokens == 4  # a 2x2 map at 64 px (32x downsampling)
    proc = VLMProcessor.for_model(vlm)
    batch = proc.prompt([[{"role": "user", "content": "the dog?"}]],
                        [torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()])
    with torch.no_grad():
        features = vlm.image_features(batch["pixel_values"])
        cells = tower.feature_map(batch["pixel_values"]).flatten(2).transpose(1, 2)
        assert torch.allclose(features, vlm.projector(cells))
        logits = vlm(**batch).logits
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = imagefm.load(tmp_path / "vlm")
    assert loaded.config == vlm.config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)
