"""Idefics3 / SmolVLM parity with transformers on tiny random models with odd shapes.

The references (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration`` and
their processors) are built here with random weights, saved to a temporary directory and loaded
with imagefm; logits, greedy generations, image features of partly padded tiles, processor
outputs and the chat template must agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from imagefm.checkpoint import CheckpointError  # noqa: E402
from imagefm.convert.idefics3 import (  # noqa: E402
    export_idefics3,
    load_idefics3,
    load_idefics3_processor,
)
from imagefm.data.image import open_image  # noqa: E402
from imagefm.idefics3_processor import Idefics3Processor, longest_edge_size, tiled_size  # noqa: E402
from imagefm.models.idefics3 import Idefics3, Idefics3Config  # noqa: E402

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "train2017"
# SmolVLM's published chat template (transformers ships it as the processor's default).
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
           "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7)
                                         for c in range(1, 7)]
TILE, LONGEST = 32, 96  # tiles of the tower's 32 px; images resized to a longest edge of 96


def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["User: What is in this image?\n\nAssistant: A cat sitting on a red mat.",
              "Describe the second picture, please. It shows two dogs and a ball.",
              "이 사진에 무엇이 있나요? 고양이 한 마리가 있습니다.\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def _hf_processor(directory: Path, model_type: str, *, split: bool = True, backend: str = "pil"):
    kwargs = dict(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE},
                  do_image_splitting=split)
    if model_type == "smolvlm":
        ip = (transformers.SmolVLMImageProcessorPil if backend == "pil"
              else transformers.SmolVLMImageProcessor)(**kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
        return transformers.SmolVLMProcessor(
            ip, tokenizer, transformers.SmolVLMVideoProcessor(), image_seq_len=16,
            chat_template=TEMPLATE)
    ip = (transformers.Idefics3ImageProcessorPil if backend == "pil"
          else transformers.Idefics3ImageProcessor)(**kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return transformers.Idefics3Processor(ip, tokenizer, image_seq_len=16, chat_template=TEMPLATE)


def _build(directory: Path, model_type: str, *, tie: bool = False):
    """A random reference model + tokenizer + processor saved in ``directory``."""
    tok = _tokenizer_object()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", extra_special_tokens={
            "image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    fast.save_pretrained(directory)
    vocab = tok.get_vocab_size()
    config_cls = (transformers.SmolVLMConfig if model_type == "smolvlm"
                  else transformers.Idefics3Config)
    model_cls = (transformers.SmolVLMForConditionalGeneration if model_type == "smolvlm"
                 else transformers.Idefics3ForConditionalGeneration)
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=44, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=4),
        text_config=dict(model_type="llama", vocab_size=vocab, hidden_size=48,
                         intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096,
                         initializer_range=0.2, bos_token_id=tok.token_to_id("<|im_start|>"),
                         eos_token_id=tok.token_to_id("<end_of_utterance>"),
                         pad_token_id=tok.token_to_id("<|endoftext|>")),
        scale_factor=2, image_token_id=tok.token_to_id("<image>"), tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger random vision weights: image features that matter
        for p in model.model.vision_model.parameters():
            p.mul_(4.0)
        model.model.connector.modality_projection.proj.weight.normal_(0, 0.3)
    model.save_pretrained(directory)
    processor = _hf_processor(directory, model_type)
    processor.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference, processor = _build(directory, request.param)
    return reference, processor, load_idefics3(directory), directory


def _photo(index: int) -> Image.Image:
    files = sorted(COCO.glob("*.jpg")) if COCO.is_dir() else []
    if len(files) <= index:
        pytest.skip(f"{COCO} is absent (../shared/data): no real photos to test on")
    return open_image(files[index])


def _synthetic(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1),
                     (x + y) * 127 // max(width + height, 1)], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return image.convert(mode)


def _conversation(images: list) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                         {"type": "text", "text": "What is in this image?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat on a red mat."}]},
            {"role": "user", "content": [{"type": "text", "text": "And here? "},
                                         {"type": "image", "image": images[1]}]}]


def _text(conversation: list[dict]) -> list[dict]:
    """The conversation as the reference's template sees it (image parts without pictures)."""
    return [{**m, "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                              for p in m["content"]]} for m in conversation]


# --- the model -------------------------------------------------------------------------------

def test_logits_match_transformers(pair):
    reference, processor, model, _ = pair
    images = [_synthetic(45, 70, 1), _synthetic(83, 29, 2)]  # odd sizes: 3x2 and 2x3 tiles
    prompt = processor.apply_chat_template(_text(_conversation(images)), add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images], return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 7 + 7  # 3x2 + global, 2x3 + global
    with torch.no_grad():
        expected = reference(**inputs).logits
        ours = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                     pixel_attention_mask=inputs["pixel_attention_mask"],
                     attention_mask=inputs["attention_mask"]).logits
    assert inputs["input_ids"].shape[1] > 14 * 16  # the image tokens are there
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_batch_with_padding_tiles_matches(pair):
    """Two prompts with 14 and 1 tiles: the second is padded with all-zero tiles (dropped) and
    its text on the right; real positions agree."""
    reference, processor, model, _ = pair
    images = [[_synthetic(45, 70, 1), _synthetic(83, 29, 2)], [_synthetic(20, 24, 3)]]
    texts = [processor.apply_chat_template(_text(_conversation(images[0])),
                                           add_generation_prompt=True),
             "<|im_start|>User:<image>Hi there<end_of_utterance>\nAssistant:"]
    inputs = processor(text=texts, images=images, padding=True, padding_side="right",
                       return_tensors="pt")
    assert inputs["pixel_values"].shape[:2] == (2, 14)
    with torch.no_grad():
        expected = reference(**inputs).logits
        ours = model(**{k: inputs[k] for k in ("input_ids", "pixel_values",
                                               "pixel_attention_mask", "attention_mask")}).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[real], atol=1e-4, rtol=1e-4)


def test_partly_padded_tiles_match(pair):
    """Tiles whose pixel_attention_mask covers only part of them (as a batch of unequal,
    unsplit images would be padded): positions are bucketed, padding keys masked."""
    reference, _, model, _ = pair
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 3, 40, 40)  # larger than the trained 32 px: positions rescaled
    mask = torch.zeros(1, 3, 40, 40, dtype=torch.long)
    mask[0, 0] = 1
    mask[0, 1, :27, :33] = 1  # 7 x 9 real patches of 4 px (27 rounds up to a partial patch)
    mask[0, 2, :12, :40] = 1
    with torch.no_grad():
        expected = reference.model.get_image_features(pixels, mask).pooler_output[0]
        ours = model.image_features(pixels, mask)
    torch.testing.assert_close(ours.reshape(expected.shape), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("side", [8, 19, 25, 26, 27, 32])
def test_tile_position_ids_match_reference(side):
    """The reference's bucketed positions, read off its embedding layer (ids as the only
    embedding values), for full and partly padded tiles: for some grid sides (19, 25...) its
    float arithmetic repeats a few positions even on full tiles, and so do we."""
    from transformers.models.idefics3.modeling_idefics3 import (
        Idefics3VisionConfig,
        Idefics3VisionEmbeddings,
    )

    from imagefm.models.idefics3 import tile_position_ids

    embeddings = Idefics3VisionEmbeddings(Idefics3VisionConfig(
        hidden_size=1, image_size=side * 2, patch_size=2, num_channels=1))
    with torch.no_grad():
        embeddings.patch_embedding.weight.zero_()
        embeddings.patch_embedding.bias.zero_()
        ids = torch.arange(side * side, dtype=torch.float32)
        embeddings.position_embedding.weight.copy_(ids[:, None])
    grid = side + 3  # tiles larger than the trained grid, and smaller real parts
    mask = torch.zeros(4, grid, grid, dtype=torch.bool)
    mask[0] = True
    mask[1, :side, :side] = True
    mask[2, :side - 3, :grid - 1] = True
    mask[3, :5, :7] = True
    with torch.no_grad():
        expected = embeddings(torch.zeros(4, 1, grid * 2, grid * 2), mask)[..., 0].long()
    assert torch.equal(tile_position_ids(mask, side), expected)


def test_greedy_generate_matches_transformers(pair):
    reference, processor, model, _ = pair
    images = [[_synthetic(45, 70, 1), _synthetic(83, 29, 2)], [_synthetic(64, 31, 4)]]
    texts = [processor.apply_chat_template(_text(_conversation(images[0])),
                                           add_generation_prompt=True),
             "<|im_start|>User:<image>Describe it.<end_of_utterance>\nAssistant:"]
    inputs = processor(text=texts, images=images, padding=True, padding_side="left",
                       return_tensors="pt")
    eos = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        expected = reference.generate(**inputs, max_new_tokens=12, do_sample=False,
                                      eos_token_id=eos, pad_token_id=eos)
    ours = model.generate(inputs["input_ids"], inputs["pixel_values"],
                          inputs["pixel_attention_mask"], inputs["attention_mask"],
                          max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    assert ours.tolist() == expected.tolist()
    assert len(set(ours[0, -12:].tolist())) > 1  # not one token over and over


def test_image_token_count_is_checked(pair):
    _, processor, model, _ = pair
    image = _synthetic(45, 70, 1)
    inputs = processor(text=["<|im_start|>User:<image>Hi"], images=[[image]], return_tensors="pt")
    ids = inputs["input_ids"]
    first = int((ids[0] == model.config.image_token_id).nonzero()[0])
    ids = torch.cat([ids[:, :first], ids[:, first + 1:]], dim=1)  # one <image> token fewer
    with pytest.raises(ValueError, match="111 <image> tokens but the images give 112"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"],
              pixel_attention_mask=inputs["pixel_attention_mask"])


def test_bf16_load_on_meta_device(pair):
    """As imagefm.load reads it: parameters built on the meta device, the checkpoint's tensors
    assigned in bfloat16; logits stay close to float32's and generation runs."""
    from imagefm.checkpoint import has_meta_parameters, load_options

    _, processor, model, directory = pair
    with load_options(dtype=torch.bfloat16, empty_init=True):
        half_model = load_idefics3(directory)
    assert not has_meta_parameters(half_model)
    assert {p.dtype for p in half_model.parameters()} == {torch.bfloat16}
    inputs = processor(text=["<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"],
                       images=[[_synthetic(45, 70, 1)]], return_tensors="pt")
    args = {k: inputs[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")}
    with torch.no_grad():
        full = model(**args).logits
        half = half_model(**args).logits
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1 * full.abs().max()
    out = half_model.generate(**args, max_new_tokens=3)
    assert out.shape == (1, args["input_ids"].shape[1] + 3)


# --- the processor -------------------------------------------------------------------------

def _compare_processors(ours: Idefics3Processor, theirs, conversations, *, exact: bool) -> None:
    batch = ours.apply_chat_template(conversations, padding_side="right")
    texts = [theirs.apply_chat_template(_text(c), add_generation_prompt=True)
             for c in conversations]
    assert texts == [ours.render(c) for c in conversations]
    images = [[p["image"] for m in c for p in m["content"] if p["type"] == "image"]
              for c in conversations]
    expected = theirs(text=texts, images=images, padding=True, padding_side="right",
                      return_tensors="pt")
    assert batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert batch["attention_mask"].tolist() == expected["attention_mask"].tolist()
    assert batch["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.equal(batch["pixel_attention_mask"], expected["pixel_attention_mask"].long())
    if exact:
        torch.testing.assert_close(batch["pixel_values"], expected["pixel_values"], atol=1e-6,
                                   rtol=0)
    else:  # torchvision's Lanczos: a grey level or two off here and there
        diff = (batch["pixel_values"] - expected["pixel_values"]).abs()
        assert diff.max() <= 3 / 255 / 0.5 + 1e-6  # measured: 2 levels on 0.4% of values
        assert diff.mean() < 1e-3


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_processor_matches_reference(pair, backend):
    _, _, _, directory = pair
    model_type = json.loads((directory / "config.json").read_text())["model_type"]
    theirs = _hf_processor(directory, model_type, backend=backend)
    ours = load_idefics3_processor(directory)
    photos = [_photo(0), _photo(5), _photo(7)]  # 640x422, 427x640 (tall), 500x500
    conversations = [
        _conversation([photos[0], _synthetic(5, 3, 5)]),  # a tiny image is upscaled
        _conversation([photos[1], _synthetic(301, 37, 6, "L")]),  # grey, very wide
        [{"role": "user", "content": [{"type": "text", "text": "이것은? "},
                                      {"type": "image", "image": photos[2]}]}],
    ]
    _compare_processors(ours, theirs, conversations, exact=backend == "pil")


def test_processor_without_splitting_matches(tmp_path):
    model, processor = _build(tmp_path, "idefics3")
    theirs = _hf_processor(tmp_path, "idefics3", split=False)
    theirs.save_pretrained(tmp_path)  # the directory now says do_image_splitting = false
    ours = load_idefics3_processor(tmp_path)
    assert not ours.config.image.split
    conversations = [_conversation([_synthetic(45, 70, 1), _synthetic(83, 29, 2)])]
    _compare_processors(ours, theirs, conversations, exact=True)


def test_resize_arithmetic_matches_reference():
    from transformers.models.idefics3 import image_processing_idefics3 as ref

    sizes = []
    proc = ref.Idefics3ImageProcessor()
    proc.resize = lambda image, size, **_: sizes.append((size.height, size.width))
    for height, width in [(422, 640), (640, 427), (5, 3), (37, 301), (500, 500), (7, 9000)]:
        for longest in (LONGEST, 5000):  # 5000: capped at 4096
            expected = ref._resize_output_size_rescale_to_max_len(height, width, max_len=longest)
            expected = ref._resize_output_size_scale_below_upper_bound(*expected, max_len=4096)
            assert longest_edge_size(height, width, longest) == expected
            proc.resize_for_vision_encoder(torch.zeros(1, 1, *expected), TILE)
            assert tiled_size(*expected, TILE) == sizes[-1]


# --- checkpoints ---------------------------------------------------------------------------

def _reload(directory: Path) -> Idefics3:
    """imagefm.load once the loading layer knows the architecture; until then the same steps."""
    from imagefm.loading import _architectures, load_imagefm

    if Idefics3.architecture in _architectures():
        return load_imagefm(directory)
    from imagefm.checkpoint import CHAT_TEMPLATE_FILE, WEIGHTS_FILE, load_state_dict_file, read_meta
    from imagefm.tokenizer import Tokenizer

    meta = read_meta(directory)
    assert meta["architecture"] == Idefics3.architecture
    model = Idefics3(Idefics3Config.from_dict(meta["config"]))
    model.load_state_dict(load_state_dict_file(directory / WEIGHTS_FILE), strict=True)
    model.tokenizer = Tokenizer.from_pretrained(directory)
    model.chat_template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return model.eval()


def test_imagefm_round_trip(pair, tmp_path):
    _, processor, model, _ = pair
    model.save_pretrained(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "imagefm.json").read_text())
    assert meta["architecture"] == "idefics3"
    assert meta["config"]["image"]["tile_size"] == TILE  # the processor's settings are data
    again = _reload(tmp_path / "saved")
    assert again.config == model.config
    reloaded = load_idefics3_processor(tmp_path / "saved")
    conversation = _conversation([_synthetic(45, 70, 1), _synthetic(83, 29, 2)])
    batch = reloaded.apply_chat_template(conversation)
    first = Idefics3Processor.for_model(model).apply_chat_template(conversation)
    assert batch["input_ids"].tolist() == first["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_export_loads_in_transformers(pair, tmp_path):
    reference, _, model, directory = pair
    export_idefics3(model, tmp_path / "hf")
    cls = type(reference)
    exported = cls.from_pretrained(tmp_path / "hf").eval()
    theirs = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert theirs.image_seq_len == 16 and theirs.image_processor.max_image_size == {
        "longest_edge": TILE} and theirs.image_processor.size == {"longest_edge": LONGEST}
    conversation = _conversation([_synthetic(45, 70, 1), _synthetic(83, 29, 2)])
    text = theirs.apply_chat_template(_text(conversation), add_generation_prompt=True)
    inputs = theirs(text=[text], images=[[_synthetic(45, 70, 1), _synthetic(83, 29, 2)]],
                    return_tensors="pt")
    ours = Idefics3Processor.for_model(model).apply_chat_template(conversation)
    assert ours["input_ids"].tolist() == inputs["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(exported(**inputs).logits, reference(**inputs).logits,
                                   atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_strict_keys(tmp_path):
    reference, processor = _build(tmp_path, "smolvlm", tie=True)
    assert reference.lm_head.weight is reference.model.text_model.embed_tokens.weight
    model = load_idefics3(tmp_path)
    assert model.config.lm.tie_embeddings and model.lm.lm_head is None
    inputs = processor(text=["<|im_start|>User:<image>Hi"], images=[[_synthetic(45, 70, 1)]],
                       return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits,
                                   atol=1e-4, rtol=1e-4)
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.connector.modality_projection.proj.weight")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*\n.*projector.fc1.weight"):
        load_idefics3(tmp_path)
