"""Export back: a VLM imagefm loaded and changed, or built from a config, saves in the Hugging
Face layout and loads in transformers with equal logits and greedy tokens.

For each family a tiny random reference is built by its parity tests' builders (Qwen2-VL,
Qwen2.5-VL, LLaVA-OneVision; LLaVA-1.5 here), loaded with imagefm, its weights perturbed (so the
export is not the reference's files again) and exported. The export directory is then loaded
with transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor``; the processor's batch
(conversations with several images of odd sizes) must give the logits and greedy tokens of our
model. The export also reloads in imagefm unchanged, and its config files are what transformers
writes when it saves the same model again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "LlavaOnevisionImageProcessorPil"):
    pytest.skip("the references are built with transformers 5", allow_module_level=True)

import test_llava_onevision as onevision_test  # noqa: E402
import test_qwen2_5_vl as qwen2_5_vl_test  # noqa: E402
import test_qwen2_vl as qwen2_vl_test  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vlm_fixtures import noise_image  # noqa: E402

import imagefm  # noqa: E402
from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.llama import load_lm_tokenizer  # noqa: E402
from imagefm.convert.llava import export_llava, load_llava  # noqa: E402
from imagefm.convert.llava_onevision import (  # noqa: E402
    export_llava_onevision,
    load_llava_onevision,
)
from imagefm.convert.qwen2_vl import export_qwen2_vl, load_qwen2_vl  # noqa: E402
from imagefm.models.decoder_config import DecoderConfig  # noqa: E402
from imagefm.models.qwen2_vl_vision import QwenVisionConfig  # noqa: E402
from imagefm.models.qwen_vl import QwenImageConfig, QwenVL, QwenVLConfig  # noqa: E402

# llava-hf/llava-1.5-*-hf's chat template (its chat_template.json), as test data.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
LLAVA_SIZE, LLAVA_PATCH = 30, 6  # a 5 x 5 patch grid and a class token


def _perturb(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


# --- the references ------------------------------------------------------------------------------


def _llava_reference(factory) -> Path:
    """A LLaVA-1.5-shaped reference: CLIP tower (features of block -2 without CLS), Llama LM;
    saved as transformers saves it."""
    directory = factory.mktemp("llava")
    tokenizer = onevision_test._tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in onevision_test.SPECIALS}
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
            image_size=LLAVA_SIZE, patch_size=LLAVA_PATCH),
        text_config=transformers.LlamaConfig(
            vocab_size=300, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=None, eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"]),
        image_token_index=ids["<image>"], vision_feature_layer=-2,
        image_seq_length=(LLAVA_SIZE // LLAVA_PATCH) ** 2)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2 if p.dim() >= 2 else 0.1)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": LLAVA_SIZE}, crop_size={"height": LLAVA_SIZE, "width": LLAVA_SIZE})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _llava_conversations():
    first = [{"role": "user", "content": [{"type": "image", "image": noise_image(45, 71, 1)},
                                          {"type": "text", "text": "What is in the picture?"}]}]
    second = [{"role": "user", "content": [{"type": "image", "image": noise_image(97, 33, 2)},
                                           {"type": "image", "image": noise_image(31, 30, 3)},
                                           {"type": "text", "text": "고양이 사진입니다?"}]}]
    return first, second


def _batch(processor, conversations) -> dict[str, torch.Tensor]:
    return processor.apply_chat_template(list(conversations), add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt",
                                         padding=True, padding_side="left")


def _qwen_batch(processor, conversations) -> dict[str, torch.Tensor]:
    return qwen2_vl_test._reference_batch(processor, conversations)[1]


@dataclass
class Case:
    family: str
    hf_class: str
    reference: Path  # the reference's directory, as transformers saved it
    model: torch.nn.Module  # loaded from it with imagefm, then perturbed
    export: Path
    conversations: Any
    batch: Any  # (processor, conversations) -> the processor's batch


# name: (build the reference, loader, exporter, HF class, conversations, batch). The parity
# tests' reference fixtures are called as the plain functions they wrap (``__wrapped__``).
FAMILIES = {
    "qwen2_vl": (lambda f: qwen2_vl_test.reference.__wrapped__(f)[2], load_qwen2_vl,
                 export_qwen2_vl, "Qwen2VLForConditionalGeneration",
                 qwen2_vl_test._conversations, _qwen_batch),
    "qwen2_5_vl": (lambda f: qwen2_5_vl_test.reference.__wrapped__(f)[2], load_qwen2_vl,
                   export_qwen2_vl, "Qwen2_5_VLForConditionalGeneration",
                   qwen2_vl_test._conversations, _qwen_batch),
    "llava_onevision": (lambda f: onevision_test.reference.__wrapped__(f)[2],
                        load_llava_onevision, export_llava_onevision,
                        "LlavaOnevisionForConditionalGeneration", onevision_test._conversations,
                        _batch),
    "llava": (_llava_reference, load_llava, export_llava, "LlavaForConditionalGeneration",
              _llava_conversations, _batch),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory) -> Case:
    build, load, export, hf_class, conversations, batch = FAMILIES[request.param]
    reference = build(tmp_path_factory)
    model = load(reference)
    _perturb(model)
    directory = export(model, tmp_path_factory.mktemp(f"{request.param}_export"))
    return Case(request.param, hf_class, reference, model, directory, conversations(), batch)


@pytest.fixture(scope="module")
def exported(case):
    """(the export loaded with transformers, its AutoProcessor, that processor's batch)."""
    hf_model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        case.export, output_loading_info=True)
    assert type(hf_model).__name__ == case.hf_class
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    processor = transformers.AutoProcessor.from_pretrained(case.export)
    return hf_model.eval(), processor, case.batch(processor, case.conversations)


# --- every family --------------------------------------------------------------------------------


def test_export_is_the_changed_model_not_the_reference(case):
    ours, original = load_file(case.export / "model.safetensors"), load_file(
        case.reference / "model.safetensors")
    common = set(ours) & set(original)
    assert len(common) > 10
    assert not any(torch.equal(ours[k], original[k]) for k in common)
    assert (case.export / "config.json").is_file() and not (
        case.export / "imagefm_tokenizer.json").exists()


def test_transformers_logits_equal_ours(case, exported):
    hf_model, _, batch = exported
    assert int(batch["input_ids"].eq(case.model.config.image_token_id).sum()) > 10
    with torch.no_grad():
        expected = hf_model(**batch).logits
        ours = case.model(**batch).logits
    real = batch["attention_mask"].bool()
    assert expected.abs().max() > 1.0  # logits that say something
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def test_transformers_greedy_tokens_equal_ours(case, exported):
    hf_model, _, batch = exported
    new = 8
    expected = hf_model.generate(**batch, max_new_tokens=new, do_sample=False)
    ours = case.model.generate(**batch, max_new_tokens=new)
    assert ours.shape[1] == batch["input_ids"].shape[1] + new  # all 8 steps ran
    assert torch.equal(ours, expected)


def test_export_reloads_in_imagefm_unchanged(case, exported):
    _, hf_processor, batch = exported
    again = imagefm.load(case.export)
    assert type(again) is type(case.model) and again.config == case.model.config
    assert getattr(again, "card", None) == getattr(case.model, "card", None)  # LLaVA's
    state, expected = again.state_dict(), case.model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert again.chat_template == case.model.chat_template
    processor = imagefm.load_processor(case.export)
    if case.family == "llava":  # the VLM processor has its own interface; its images agree
        images = [p["image"] for m in case.conversations[0] for p in m["content"]
                  if p["type"] == "image"]
        pixels = hf_processor.image_processor(images, return_tensors="pt")["pixel_values"]
        assert (processor.images(images) - pixels).abs().mean() < 0.02
        assert processor.image_tokens == int(batch["input_ids"][0].eq(
            case.model.config.image_token_id).sum())
        return
    ours = processor.apply_chat_template(list(case.conversations))
    for key, value in batch.items():  # pixels: the reference resamples with torchvision here
        if key == "pixel_values":
            assert (ours[key] - value).abs().mean() < 0.02
        else:
            assert torch.equal(ours[key], value.to(ours[key].dtype)), key


def _subset(ours: dict, theirs: dict, where: str = "") -> list[str]:
    """Keys of ``ours`` that ``theirs`` lacks or holds another value for."""
    wrong = []
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(theirs.get(key), dict):
            wrong += _subset(value, theirs[key], f"{where}{key}.")
        elif key not in theirs or theirs[key] != value:
            wrong.append(f"{where}{key}: {value!r} != {theirs.get(key, '<absent>')!r}")
    return wrong


def test_config_files_are_what_transformers_writes(case, exported, tmp_path):
    """transformers, saving the model and processor it loaded again, writes every key we wrote,
    with our values."""
    hf_model, processor, _ = exported
    hf_model.config.save_pretrained(tmp_path)
    hf_model.generation_config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    tokenizer_layout = {"tokenizer_class", "add_bos_token"}  # see below
    for name in ("config.json", "generation_config.json", "processor_config.json",
                 "tokenizer_config.json"):
        ours = json.loads((case.export / name).read_text())
        if name == "tokenizer_config.json":
            # We name the class PreTrainedTokenizerFast (transformers 4 and 5 read it; 5 writes
            # its alias TokenizersBackend) and say add_bos_token as imagefm's reader wants it.
            assert ours["tokenizer_class"] == "PreTrainedTokenizerFast"
            ours = {k: v for k, v in ours.items() if k not in tokenizer_layout}
        assert _subset(ours, json.loads((tmp_path / name).read_text())) == [], name
    assert (tmp_path / "chat_template.jinja").read_text() == case.model.chat_template


# --- built in imagefm, exported; what cannot be exported ------------------------------------------


def _qwen_tokenizer(directory: Path, lm: DecoderConfig):
    qwen2_vl_test._tokenizer().save_pretrained(directory)
    return load_lm_tokenizer(directory, lm)


def test_qwen2_vl_built_from_a_config_loads_in_transformers(tmp_path):
    """Tied embeddings and vision mlp_ratio 2, never loaded from HF."""
    lm = DecoderConfig(model_type="qwen2", vocab_size=290, width=48, layers=2, heads=4,
                       kv_heads=2, mlp_dim=64, norm_eps=1e-6, context_length=512,
                       qkv_bias=True, mrope_section=(2, 2, 2), tie_embeddings=True,
                       eos_token_ids=(2,), pad_token_id=0)
    config = QwenVLConfig(
        vision=QwenVisionConfig(width=32, layers=2, heads=2, mlp_dim=64, out_width=48),
        lm=lm, image=QwenImageConfig(min_pixels=qwen2_vl_test.MIN_PIXELS,
                                     max_pixels=qwen2_vl_test.MAX_PIXELS),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    model = QwenVL(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.tokenizer = _qwen_tokenizer(tmp_path / "tokenizer", lm)
    model.chat_template = qwen2_vl_test.TEMPLATE
    export_qwen2_vl(model, tmp_path / "hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")
    hf_model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert hf_model.config.vision_config.mlp_ratio == 2
    batch = _qwen_batch(processor, qwen2_vl_test._conversations())
    with torch.no_grad():
        expected = hf_model(**batch).logits
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def _composed_llava(lm_directory: Path):
    """A VLM composed in imagefm: a CLIP-shaped tower and the tiny Llama of conftest.py."""
    from imagefm.config import VisionConfig
    from imagefm.models.vit import VisionTransformer
    from imagefm.models.vlm import compose_vlm

    tower = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64,
                         act="gelu")
    model = compose_vlm(VisionTransformer(tower), imagefm.load(lm_directory),
                        vision_feature_layer=-1).eval()
    _perturb(model)
    return model


def test_composed_llava_converts_with_the_cli_and_loads_in_transformers(tiny_llama_dir, tmp_path):
    """Saved as an imagefm checkpoint, then ``imagefm convert --to hf``."""
    from typer.testing import CliRunner

    from imagefm.cli import app

    model = _composed_llava(tiny_llama_dir)
    model.save_pretrained(tmp_path / "ours")
    with pytest.raises(CheckpointError, match="holds an imagefm checkpoint"):
        export_llava(model, tmp_path / "ours")  # would overwrite its weights
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "ours"), str(tmp_path / "hf"),
                                      "--to", "hf"])
    assert result.exit_code == 0, result.output
    hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    batch = processor(text=["<image>\na small cat", "the dog <image>"],
                      images=[noise_image(40, 50, 4), noise_image(33, 32, 5)], return_tensors="pt",
                      padding=True, padding_side="left")
    assert int(batch["input_ids"].eq(model.config.image_token_id).sum()) == 2 * 16
    with torch.no_grad():
        expected = hf_model(**batch).logits
        ours = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def test_a_quantised_vlm_exports_the_float_values_of_its_blocks(tiny_llama_dir, tmp_path):
    from imagefm.models.quantized import dequantize_decoder, quantize_model

    model = quantize_model(_composed_llava(tiny_llama_dir))
    export_llava(model, tmp_path / "quantised")
    assert any(k.endswith(".qweight") for k in model.state_dict())
    dequantize_decoder(model.lm)  # in place: the same values in plain nn.Linear layers
    export_llava(model, tmp_path / "float")
    quantised, floats = (load_file(tmp_path / name / "model.safetensors")
                         for name in ("quantised", "float"))
    assert quantised.keys() == floats.keys()
    assert all(torch.equal(quantised[k], floats[k]) for k in floats)


def test_lora_layers_are_refused_until_merged(tiny_llama_dir, tmp_path):
    pytest.importorskip("peft")
    from imagefm.adapt.lora import LoraSettings, add_lora, merge_lora

    model = _composed_llava(tiny_llama_dir)
    add_lora(model, LoraSettings(targets=("q_proj", "v_proj")), towers=["lm"])
    with torch.no_grad():  # LoRA's B starts at zero: give the update a value
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    with pytest.raises(CheckpointError, match="unmerged LoRA"):
        export_llava(model, tmp_path / "hf")
    merge_lora(model)
    export_llava(model, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    merged = model.lm.blocks[0].attn.q_proj.weight
    assert torch.equal(weights["language_model.model.layers.0.self_attn.q_proj.weight"], merged)


def test_models_the_reference_cannot_express_are_refused(tiny_vlm, tmp_path):
    with pytest.raises(CheckpointError, match="projector = 'pixel_shuffle'"):
        export_llava(tiny_vlm, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
    lm = DecoderConfig(model_type="qwen2", vocab_size=64, width=48, layers=1, heads=4,
                       kv_heads=2, mlp_dim=64, qkv_bias=True, o_bias=True, mrope_section=(2, 2, 2))
    windowed = QwenVL(QwenVLConfig(
        vision=QwenVisionConfig(width=32, layers=2, heads=2, mlp_dim=40, out_width=48,
                                window_size=56),  # mlp_dim: Qwen2-VL's mlp_ratio is an int
        lm=lm, image_token_id=5, video_token_id=6, vision_start_token_id=3,
        vision_end_token_id=4))
    with pytest.raises(CheckpointError) as refused:
        export_qwen2_vl(windowed, tmp_path / "qwen")
    for field in ("vision.window_size = 56", "vision.mlp_dim = 40", "lm.o_bias = True"):
        assert field in str(refused.value)
