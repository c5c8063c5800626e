"""Model presets the Trainer builds besides the image–text dual encoders of ``imagefm.config``.

``model.preset`` names either a dual-encoder preset (``imagefm.config.PRESETS``) or one of
``MODEL_PRESETS``: speech–text, point cloud–text and other model families, each built by a
``"module:function"`` builder ``(preset name, model.config overrides, model.pretrained) -> a
fresh model`` (one builder serves a family's presets),
imported only when that preset is trained (train/launch.py ``build_model``).
"""

from __future__ import annotations

MODEL_PRESETS: dict[str, str] = {
    # lit-effnet whose image projection starts from the ImageNet head (imagefm.models.class_prior)
    "lit-effnet-prior": "imagefm.convert.class_prior:build_lit_effnet_prior",
    # CLAP speech–text dual encoders (imagefm.models.clap; presets in imagefm.convert.clap)
    "clap-tiny": "imagefm.convert.clap:build_clap",
    "clap-e5": "imagefm.convert.clap:build_clap",
    # point cloud–text (ULIP style; imagefm.models.point_encoder, presets in imagefm.train.points)
    "point-clip-tiny": "imagefm.train.points:build_point_model",
    "point-clip-e5": "imagefm.train.points:build_point_model",
    # CTC speech recognition, to pre-train an audio tower for a VLM (imagefm.train.asr)
    "speech-ctc-tiny": "imagefm.train.asr:build_speech_ctc",
}

# run.local=true (train/local.py) trains a preset's small sibling: random weights, seconds.
# (Presets of imagefm.config.PRESETS, lit-effnet-prior included, are shrunk tower by tower.)
LOCAL_PRESETS: dict[str, str] = {
    "clap-e5": "clap-tiny",
    "point-clip-e5": "point-clip-tiny",
}
