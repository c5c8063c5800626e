from __future__ import annotations

import os
from pathlib import Path

# No test may reach the real Hugging Face Hub: huggingface_hub runs offline (a cache-only rule
# it reads at import) unless a test uses the `hub` fixture, our own Hub on 127.0.0.1.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine every
    multi-threaded op waits for a busy core; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A tiny HF Llama directory with a byte-level BPE tokenizer (ChatML specials) and a chat
# template: the LM of the decoder, chat and VLM tests.
@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a small cat", "the dog runs", "작은 고양이"] * 10, trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = transformers.LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=2,
                                      bos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_vlm(tiny_llama_dir: Path):
    """A VLM of a tiny random ViT (32 px, 8 px patches) and the tiny Llama above: 16 patches
    merged 2x2 by the pixel-shuffle projector into 4 image tokens."""
    import imagefm
    from imagefm.config import VisionConfig
    from imagefm.models.vit import VisionTransformer
    from imagefm.models.vlm import compose_vlm

    tower = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64,
                         act="gelu")
    return compose_vlm(VisionTransformer(tower), imagefm.load(tiny_llama_dir),
                       projector="pixel_shuffle", pixel_shuffle=2).eval()


# A Hugging Face Hub of our own on 127.0.0.1 (tests/hub_server.py): huggingface_hub (and the
# copies other modules took of its settings) points at it and at a fresh cache under
# tmp_path / "hf_home" for the test; everything is restored after. Nothing leaves 127.0.0.1.
@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("huggingface_hub")
    from hub_env import huggingface_hub_pointed_at
    from hub_server import HubServer

    with HubServer() as server, huggingface_hub_pointed_at(server, tmp_path / "hf_home",
                                                           monkeypatch):
        yield server
