"""Tiny BERT-family tokenizers and text configs for the parity tests of Hugging Face text towers
(tests/test_parity_vision_text.py, tests/test_parity_open_clip_hf_text.py): vocabularies trained
here with `tokenizers` on English and Korean, saved in the Hub's layout by transformers' own
tokenizer classes (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = ["A photo of a cat.", "a dog running on the beach", "Two cats sleeping on a sofa",
          "고양이 사진", "해변을 달리는 강아지", "소파에서 자는 고양이 두 마리", "서울의 밤 풍경",
          "Hello World! Naïve café"]
TEXTS = ["A photo of a CAT", "해변을 달리는 강아지 사진", "two dogs", "서울의 밤 풍경 and a cat"]


def wordpiece_dir(directory: Path, lowercase: bool, max_length: int = 24) -> Path:
    """A BERT WordPiece tokenizer ([CLS] text [SEP], [PAD] = 0)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(CORPUS * 5, trainers.WordPieceTrainer(
        vocab_size=260, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tokenizer = transformers.BertTokenizer(vocab=backend.get_vocab(), do_lower_case=lowercase,
                                           model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return directory


def unigram_dir(directory: Path, max_length: int = 24) -> Path:
    """An XLM-R SentencePiece-Unigram tokenizer (<s> text </s>, <pad> = 1)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.train_from_iterator(CORPUS * 5, trainers.UnigramTrainer(
        vocab_size=150, show_progress=False, unk_token="<unk>",
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    vocab = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    tokenizer = transformers.XLMRobertaTokenizer(vocab=[*vocab, ("<mask>", 0.0)],
                                                 model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return directory


def tokenizer_dir(directory: Path, text_type: str) -> Path:
    """XLM-R: Unigram; BERT: uncased WordPiece; RoBERTa: cased WordPiece (the RoBERTa towers
    published for Korean, klue/roberta, use a BERT WordPiece tokenizer)."""
    if text_type == "xlm-roberta":
        return unigram_dir(directory)
    return wordpiece_dir(directory, lowercase=text_type == "bert")


def text_config(text_type: str, vocab_size: int, pad: int):
    """A tiny transformers config (odd shapes: head dim 5) of a bert / roberta / xlm-roberta."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=20, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=36, pad_token_id=pad)
    if text_type == "bert":
        return transformers.BertConfig(**common, max_position_embeddings=30, hidden_act="gelu")
    if text_type == "roberta":  # RoBERTa's 2 extra rows, and one token type, as published
        return transformers.RobertaConfig(**common, max_position_embeddings=32, type_vocab_size=1,
                                          hidden_act="gelu_new", layer_norm_eps=1e-5)
    return transformers.XLMRobertaConfig(**common, max_position_embeddings=34, type_vocab_size=1)


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Randomise every parameter (HF initialises LayerNorms to exactly 1/0 and biases to 0, which
    would hide a swapped norm or a dropped bias)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
