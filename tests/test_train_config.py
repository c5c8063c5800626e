"""Training config: files, dotted overrides, validation messages, the local shrink."""

from __future__ import annotations

import pytest

from imagefm.config import ConfigError
from imagefm.train.config import TrainConfig, load_config, parse_override
from imagefm.train.launch import build_model


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_file_with_overrides(tmp_path):
    path = _write(tmp_path, "c.yaml", "train:\n  steps: 50\noptim:\n  lr: 1.0e-3\n")
    config = load_config(path, ["train.steps=300", "model.preset=small", "optim.betas=[0.8, 0.9]",
                                "stage.lr_mult.vision=0.5", "run.name=2024"])
    assert config.train.steps == 300
    assert config.optim.lr == 1e-3
    assert config.model.preset == "small"
    assert config.optim.betas == [0.8, 0.9]
    assert config.stage.lr_mult == {"vision": 0.5}
    assert config.run.name == "2024"  # a number where a name belongs is taken as the name


def test_toml_file(tmp_path):
    path = _write(tmp_path, "c.toml", "[train]\nsteps = 7\n[data]\nbatch_size = 4\n")
    config = load_config(path)
    assert (config.train.steps, config.data.batch_size) == (7, 4)


def test_ints_are_accepted_for_floats(tmp_path):
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    (["train.stepz=3"], "unknown key(s) in train: stepz"),
    (["trian.steps=3"], "unknown key(s) in the config: trian"),
    (["train.steps=many"], "train.steps must be int, got 'many'"),
    (["train.steps=2.5"], "train.steps must be int"),
    (["run.resume=1"], "run.resume must be bool"),
    (["train.steps=0"], "train.steps must be >= 1"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["train.precision=fp8"], "train.precision = 'fp8' is not one of auto, bf16, fp32"),
    (["model.preset=huge"], "model.preset = 'huge' is unknown"),
    (["optim.betas=0.9"], "optim.betas must be a list"),
    (["train.ema_decay=1.5"], "train.ema_decay must be in [0, 1)"),
    (["stage.wise_alpha=1.2"], "stage.wise_alpha must be in [0, 1]"),
    (["stage.wise_alpha=0.5", "train.ema_decay=0.9"], "stage.wise_alpha interpolates plain"),
    (["train.gradcache_chunk=4", "train.strategy=fsdp"], "needs train.strategy=ddp"),
    (["train.steps"], "must look like section.key=value"),
    (["train.steps.max=3"], "train.steps must be int, got {'max': 3}"),
])
def test_bad_values_say_what_to_fix(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_a_value_cannot_become_a_section(tmp_path):
    path = _write(tmp_path, "c.yaml", "train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="train.steps is a value, not a section"):
        load_config(path, ["train.steps.max=3"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(_write(tmp_path, "c.json", "{}"))
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(_write(tmp_path, "c.yaml", "train: [unclosed\n"))


def test_parse_override_types():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=runs/x") == ("a.b", "runs/x")
    assert parse_override("a.b={x: 1}") == ("a.b", {"x": 1})


def test_local_shrinks_but_overrides_win(tmp_path):
    big = _write(tmp_path, "big.yaml", "model: {preset: clip-vit-b-16}\n"
                 "train: {steps: 100000}\ndata: {batch_size: 4096}\n")
    config = load_config(big, ["run.local=true"])
    assert config.train.steps == 20 and config.data.batch_size == 8
    assert config.model.preset == "tiny" and config.model.config["vision"]["layers"] == 1
    model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert load_config(big, ["run.local=true", "train.steps=7"]).train.steps == 7
    siglip = load_config(None, ["model.preset=siglip-vit-b-16", "run.local=true"])
    assert build_model(siglip).config.model_type == "siglip"


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["train.steps=9", "stage.preset=lit",
                                "model.config={embed_dim: 64}"])
    path = _write(tmp_path, "resolved.yaml", config.to_yaml())
    assert load_config(path) == config


def test_model_overrides_are_validated_by_the_model_config():
    config = TrainConfig.from_dict({"model": {"config": {"vision": {"layerz": 2}}}})
    with pytest.raises(ConfigError, match="unknown key.*vision: layerz"):
        build_model(config)


@pytest.mark.parametrize(("preset", "small"), [("clap-e5", "clap-tiny"),
                                               ("point-clip-e5", "point-clip-tiny")])
def test_run_local_trains_the_small_sibling_of_other_model_families(preset, small, tmp_path):
    path = tmp_path / "run.yaml"  # in the file: explicit overrides would win over the shrink
    path.write_text(f"model: {{preset: {preset}, config: {{embed_dim: 64}}}}\n")
    config = load_config(path, ["run.local=true"])
    assert config.model.preset == small
    assert config.model.pretrained is False
    assert config.model.config == {}  # the small preset as it is: no tower overrides
