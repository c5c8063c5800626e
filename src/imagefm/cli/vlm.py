"""VLM commands: ``imagefm vlm-init`` composes a VLM; ``imagefm vlm-eval`` measures one.

    imagefm vlm-init --vision runs/quickstart/model --lm smollm2.gguf --out vlm-init \\
        --projector pixel_shuffle --pixel-shuffle 2
    imagefm train configs/vlm-align.yaml model.init=vlm-init
    imagefm vlm-eval runs/vlm-sft/final --questions 200
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("vlm-init")
    def vlm_init(
        vision: Path = typer.Option(..., help="A dual encoder (imagefm, HF CLIP/SigLIP, "
                                              "open_clip) whose image tower becomes the VLM's."),
        lm: Path = typer.Option(..., help="The language model: a .gguf file, an HF "
                                          "Llama/Qwen2 directory or an imagefm decoder."),
        out: Path = typer.Option(..., help="Where to write the new VLM (imagefm format)."),
        projector: str = typer.Option("mlp2x_gelu", help="mlp2x_gelu (one token per patch) or "
                                                         "pixel_shuffle (factor² fewer)."),
        pixel_shuffle: int = typer.Option(1, "--pixel-shuffle", min=1,
                                          help="Merge factor for the pixel_shuffle projector."),
        feature_layer: int = typer.Option(-1, help="Vision hidden state to read (HF indexing: "
                                                   "-1 last block, -2 the one before)."),
        chatml: bool = typer.Option(True, "--chatml/--keep-template",
                                    help="Use plain ChatML (default), or keep the LM's own "
                                         "chat template."),
        seed: int = typer.Option(0, help="Seed of the projector's initialisation."),
        arch: str = typer.Option("llava", help="llava (a fixed-size tower + projector) or "
                                               "qwen2-vl (native resolution, 2-D rotary tower, "
                                               "2x2 merger, M-RoPE; exports to transformers' "
                                               "Qwen2VLForConditionalGeneration)."),
        min_pixels: int = typer.Option(48 * 48, min=1, help="qwen2-vl: fewest pixels an image "
                                                            "is resized to."),
        max_pixels: int = typer.Option(96 * 96, min=1, help="qwen2-vl: most pixels an image "
                                                            "is resized to."),
        random_vision: bool = typer.Option(False, "--random-vision",
                                           help="qwen2-vl: the tower's shape with random "
                                                "weights (the from-scratch control)."),
    ) -> None:
        """Compose a VLM from a pretrained vision tower and LM with a new projector."""
        import torch

        import imagefm
        from imagefm.models.decoder import DecoderLM
        from imagefm.models.vlm import compose_vlm

        if arch not in ("llava", "qwen2-vl"):
            raise typer.BadParameter("choose llava or qwen2-vl", param_hint="--arch")
        torch.manual_seed(seed)
        language_model = imagefm.load(lm)
        if not isinstance(language_model, DecoderLM):
            raise typer.BadParameter(f"{lm} is a {type(language_model).__name__}, not a "
                                     f"language model", param_hint="--lm")
        if arch == "qwen2-vl":
            from imagefm.models.qwen_vl_compose import QWEN_VL_CHATML, compose_qwen_vl

            qwen = compose_qwen_vl(imagefm.load(vision), language_model, min_pixels=min_pixels,
                                   max_pixels=max_pixels, transplant=not random_vision,
                                   chat_template=(QWEN_VL_CHATML if chatml
                                                  else language_model.chat_template))
            qwen.save_pretrained(out)
            merger = sum(p.numel() for p in qwen.vision.merger.parameters())
            typer.echo(f"wrote {out}: {qwen.num_parameters / 1e6:.1f} M parameters "
                       f"({merger / 1e6:.2f} M in the new merger); Qwen2-VL with "
                       f"{qwen.config.vision.patch_size}-px patches, one LM token per "
                       f"{qwen.config.merge_size}x{qwen.config.merge_size} patches")
            return
        if chatml:
            language_model.chat_template = None  # rendered as ChatML by imagefm.chat
        model = compose_vlm(imagefm.load(vision), language_model, projector=projector,
                            pixel_shuffle=pixel_shuffle, vision_feature_layer=feature_layer)
        model.save_pretrained(out)
        projector_params = sum(p.numel() for p in model.projector.parameters())
        typer.echo(f"wrote {out}: {model.num_parameters / 1e6:.1f} M parameters "
                   f"({projector_params / 1e6:.2f} M in the new projector); "
                   f"{model.config.image_tokens} LM tokens per image")

    @app.command("vlm-eval")
    def vlm_eval(
        model_path: Path = typer.Argument(..., metavar="MODEL", help="A VLM of any family: "
                                          "imagefm, or HF LLaVA, Qwen2-VL / Qwen2.5-VL, "
                                          "LLaVA-OneVision, SmolVLM / Idefics3."),
        questions: int = typer.Option(200, min=1, help="New scenes per language and split."),
        langs: str = typer.Option("en,ko", help="Comma-separated languages."),
        splits: str = typer.Option("all,eval", help="all: every colour/shape combination; "
                                                    "eval: only those held out of training."),
        style: str = typer.Option("clean", help="Scene style: clean (the quickstart's) or "
                                                "varied."),
        captions: int = typer.Option(8, min=0, help="Also caption this many Tux Paint test "
                                                    "pictures (when the package is installed)."),
        out: Path = typer.Option(None, help="Write results.json and report.md here."),
        seed: int = typer.Option(12345, help="Seed of the evaluation scenes."),
        blind: bool = typer.Option(True, "--blind/--no-blind",
                                   help="Also score the model shown a grey picture instead of "
                                        "each scene (what the questions alone give away)."),
        image_size: int = typer.Option(None, "--image-size", min=16,
                                       help="Side of the scenes in pixels (default: the "
                                            "model's input size; 64 for models that see "
                                            "images at their own size)."),
        device: str = typer.Option("auto", help="auto, cpu, cuda..."),
    ) -> None:
        """Exact-match accuracy on new synthetic questions (English and Korean) and captions
        of real Tux Paint test pictures."""
        import json

        import imagefm
        from imagefm.apps.quickstart import SCENE_STYLES
        from imagefm.apps.search.index import pick_device
        from imagefm.eval.vqa import caption_tuxpaint, evaluate_vqa, vqa_markdown
        from imagefm.vlm_runtime import chat_processor, is_vlm

        model = imagefm.load(model_path)
        if not is_vlm(model):
            raise typer.BadParameter(f"{model_path} is a {type(model).__name__}, not a VLM",
                                     param_hint="MODEL")
        if style not in SCENE_STYLES:
            raise typer.BadParameter(f"choose one of {', '.join(SCENE_STYLES)}",
                                     param_hint="--style")
        model = model.to(pick_device(device)).eval()
        processor = chat_processor(model)  # what load_processor reads, from the loaded model
        lang_list = [x.strip() for x in langs.split(",") if x.strip()]
        results = [evaluate_vqa(model, processor, n=questions, langs=lang_list, split=split,
                                seed=seed, style=SCENE_STYLES[style], blind=is_blind,
                                progress=True, image_size=image_size)
                   for split in [s.strip() for s in splits.split(",") if s.strip()]
                   for is_blind in ((False, True) if blind else (False,))]
        for result in results:
            per_lang = ", ".join(f"{k} {c / n:.1%} ({n})" for k, (c, n) in
                                 sorted(result.by_lang.items()))
            typer.echo(f"split {result.split}: exact match {result.accuracy:.1%} -- {per_lang}")
        captioned = caption_tuxpaint(model, processor, captions, lang_list) if captions else []
        for row in captioned:
            typer.echo(f"{row['name']}: " + " | ".join(f"{lang}: {row[lang]}"
                                                       for lang in lang_list))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            payload = {"model": str(model_path), "vqa": [r.to_dict() for r in results],
                       "captions": captioned}
            (out / "results.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False),
                                              encoding="utf-8")
            (out / "report.md").write_text(vqa_markdown(results, captioned, lang_list),
                                           encoding="utf-8")
            typer.echo(f"wrote {out / 'results.json'} and {out / 'report.md'}")
