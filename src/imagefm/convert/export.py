"""Any model imagefm holds → the Hugging Face directory of the transformers class that computes
the same (``imagefm convert SRC DST --to hf``).

    DualEncoder       CLIPModel / SiglipModel                     convert.hf.export_hf
    DecoderLM         LlamaForCausalLM / Qwen2... / Qwen3...      convert.llama.export_hf_lm
    VLM               LlavaForConditionalGeneration               convert.llava.export_llava
    LlavaOneVision    LlavaOnevisionForConditionalGeneration      convert.llava_onevision
    QwenVL            Qwen2VL... / Qwen2_5_VLForConditionalGeneration   convert.qwen2_vl
    Idefics3          Idefics3... / SmolVLMForConditionalGeneration     convert.idefics3

Each exporter refuses, naming the fields, a model its HF class cannot express.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from imagefm.checkpoint import CheckpointError
from imagefm.convert.hf import export_hf
from imagefm.convert.idefics3 import export_idefics3
from imagefm.convert.llama import export_hf_lm
from imagefm.convert.llava import export_llava
from imagefm.convert.llava_onevision import export_llava_onevision
from imagefm.convert.qwen2_vl import export_qwen2_vl
from imagefm.models.decoder import DecoderLM
from imagefm.models.dual_encoder import DualEncoder
from imagefm.models.idefics3 import Idefics3
from imagefm.models.llava_onevision import LlavaOneVision
from imagefm.models.qwen_vl import QwenVL
from imagefm.models.vlm import VLM

EXPORTERS = {DualEncoder: export_hf, DecoderLM: export_hf_lm, VLM: export_llava,
             LlavaOneVision: export_llava_onevision, QwenVL: export_qwen2_vl,
             Idefics3: export_idefics3}


def export_to_hf(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` as the Hugging Face directory its transformers class loads."""
    for cls, export in EXPORTERS.items():
        if isinstance(model, cls):
            return export(model, path)
    names = ", ".join(cls.__name__ for cls in EXPORTERS)
    raise CheckpointError(f"a {type(model).__name__} cannot be exported to Hugging Face format "
                          f"yet (imagefm exports {names})")
