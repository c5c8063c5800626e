"""The loading layer: Hub ids through our own Hub on 127.0.0.1 (tests/hub_server.py), the cache,
offline mode, revisions, the pickle rule, every error a user can meet, dtype, and the layering
(imagefm.checkpoint is a leaf)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import imagefm
from imagefm.checkpoint import CheckpointError
from imagefm.cli import app
from imagefm.hub import HubError, parse_hub_id
from imagefm.models.dual_encoder import DualEncoder
from imagefm.processor import Processor

transformers = pytest.importorskip("transformers")


def _tiny_hf_clip(seed: int = 0) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=40,
                         num_hidden_layers=2, num_attention_heads=3,
                         max_position_embeddings=16, eos_token_id=98),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=3, image_size=30, patch_size=6),
        projection_dim=20)
    return transformers.CLIPModel(config).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 30, 30, generator=generator)
    ids = torch.randint(1, 97, (3, 7), generator=generator)
    ids[:, -1] = 98
    return pixels, ids


def _check_clip(model: DualEncoder, reference: transformers.CLIPModel, atol: float = 1e-5) -> None:
    pixels, ids = _inputs()
    with torch.no_grad():
        ours = model(pixel_values=pixels.to(model.logit_scale.dtype), input_ids=ids)
        theirs = reference(pixel_values=pixels.to(reference.dtype), input_ids=ids)
    torch.testing.assert_close(ours.logits_per_image.float(), theirs.logits_per_image.float(),
                               atol=atol, rtol=atol)


def _hf_repo(tmp_path: Path, name: str, seed: int = 0, pickle: bool = False,
             **save: object) -> tuple[Path, object]:
    reference = _tiny_hf_clip(seed)
    folder = tmp_path / "repos" / name
    reference.save_pretrained(folder, **save)
    if pickle:  # as older transformers wrote them (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    (folder / "flax_model.msgpack").write_bytes(b"\0" * 64)  # what a format doesn't need
    return folder, reference


def test_hub_id_download_cache_and_offline_reload(hub, tmp_path: Path) -> None:
    folder, reference = _hf_repo(tmp_path, "clip")
    hub.add_repo("org/tiny-clip", folder)
    model = imagefm.load("org/tiny-clip")
    _check_clip(model, reference)
    fetched = set(hub.downloaded("org/tiny-clip"))
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert "flax_model.msgpack" not in fetched  # only the files the format needs
    hub.clear_log()
    with hub.offline(stop_server=False):  # listening, so a request would show in the log
        again, proc = imagefm.load("org/tiny-clip", processor=True)
    assert hub.requests == []
    _check_clip(again, reference)
    assert isinstance(proc, Processor) and proc.card.image_size == 30
    with hub.stopped():  # no network, not offline: the cache still serves it
        _check_clip(imagefm.load("hf-hub:org/tiny-clip"), reference)


def test_imagefm_repo_by_hf_hub_prefix_with_processor(hub, tmp_path: Path) -> None:
    model = DualEncoder(imagefm.preset("tiny")).eval()
    model.save_pretrained(tmp_path / "mine")
    hub.add_repo("me/tiny", tmp_path / "mine")
    loaded, proc = imagefm.load("hf-hub:me/tiny", processor=True)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert isinstance(proc, Processor)
    assert isinstance(imagefm.load_processor("me/tiny"), Processor)


def test_revisions_branch_tag_and_commit(hub, tmp_path: Path) -> None:
    old_folder, old = _hf_repo(tmp_path, "v1", seed=1)
    new_folder, new = _hf_repo(tmp_path, "v2", seed=2)
    old_sha = hub.add_repo("org/clip", old_folder, tags=("v1.0",))
    hub.add_repo("org/clip", new_folder)
    _check_clip(imagefm.load("org/clip"), new)
    _check_clip(imagefm.load("org/clip", revision="v1.0"), old)
    _check_clip(imagefm.load(f"org/clip@{old_sha}"), old)
    with pytest.raises(HubError, match=r"org/clip has no revision 'nope'.*branch, tag"):
        imagefm.load("org/clip", revision="nope")
    with pytest.raises(CheckpointError, match="keep one"):
        imagefm.load("org/clip@v1.0", revision="main")


def test_pickle_only_repo_is_read_weights_only(hub, tmp_path: Path) -> None:
    folder, reference = _hf_repo(tmp_path, "bin", pickle=True)
    assert (folder / "pytorch_model.bin").is_file()
    hub.add_repo("org/old-clip", folder)
    with pytest.warns(UserWarning, match=r"pickle.*weights_only=True"):
        model = imagefm.load("org/old-clip")
    _check_clip(model, reference)


def test_safetensors_preferred_over_pickle(hub, tmp_path: Path) -> None:
    folder, reference = _hf_repo(tmp_path, "both")
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    hub.add_repo("org/both", folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no pickle warning: the .bin is not read
        _check_clip(imagefm.load("org/both"), reference)
    assert "pytorch_model.bin" not in hub.downloaded("org/both")


def test_sharded_safetensors(hub, tmp_path: Path) -> None:
    folder, reference = _hf_repo(tmp_path, "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    hub.add_repo("org/sharded", folder)
    _check_clip(imagefm.load("org/sharded"), reference)


def test_errors_name_the_repo_and_the_fix(hub, tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"org/missing: no such model on the Hub.*private"):
        imagefm.load("org/missing")
    folder, reference = _hf_repo(tmp_path, "gated")
    hub.add_repo("org/gated", folder, gated=True, token="hf_secret")
    with pytest.raises(HubError, match=r"org/gated is gated: accept its conditions.*log in"):
        imagefm.load("org/gated")
    _check_clip(imagefm.load("org/gated", token="hf_secret"), reference)
    with hub.stopped(), pytest.raises(HubError, match=r"cannot reach the Hub.*imagefm download"):
        imagefm.load("org/never-cached")
    with hub.offline(), pytest.raises(HubError, match=r"not in the Hub cache.*HF_HUB_OFFLINE"):
        imagefm.load("org/never-cached")
    with pytest.raises(CheckpointError, match=r"does not exist.*Hub id"):
        imagefm.load(tmp_path / "no" / "such" / "dir")


def test_download_command_fills_the_cache(hub, tmp_path: Path) -> None:
    folder, reference = _hf_repo(tmp_path, "dl")
    hub.add_repo("org/dl", folder)
    result = CliRunner().invoke(app, ["download", "org/dl"])
    assert result.exit_code == 0, result.output
    assert "hf checkpoint" in result.output
    hub.clear_log()
    with hub.offline(stop_server=False):
        _check_clip(imagefm.load("org/dl"), reference)
    assert hub.requests == []


def test_info_command_takes_a_hub_id(hub, tmp_path: Path) -> None:
    folder, _ = _hf_repo(tmp_path, "info")
    hub.add_repo("org/info", folder)
    result = CliRunner().invoke(app, ["info", "org/info"])
    assert result.exit_code == 0, result.output
    assert "dual_encoder (clip)" in result.output


def test_dtype_bfloat16_matches_reference_in_bfloat16(tmp_path: Path) -> None:
    reference = _tiny_hf_clip()
    reference.save_pretrained(tmp_path / "clip")
    model = imagefm.load(tmp_path / "clip", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    _check_clip(model, reference.to(torch.bfloat16), atol=3e-2)
    with pytest.raises(CheckpointError, match="dtype 'float8' is not one of"):
        imagefm.load(tmp_path / "clip", dtype="float8")


def test_dtype_auto_keeps_the_stored_dtype(tmp_path: Path) -> None:
    reference = _tiny_hf_clip().to(torch.float16)
    reference.save_pretrained(tmp_path / "clip16")
    model = imagefm.load(tmp_path / "clip16", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_parse_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_id("google/siglip-base-patch16-224") == ("google/siglip-base-patch16-224",
                                                                None)
    assert parse_hub_id("hf-hub:timm/ViT-B-16-SigLIP@v2") == ("timm/ViT-B-16-SigLIP", "v2")
    assert parse_hub_id("a/b/c") is None and parse_hub_id("model.gguf") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "model").mkdir(parents=True)
    assert parse_hub_id("runs/model") is None  # a folder on disk wins
    with pytest.raises(HubError, match="not a hub id"):
        parse_hub_id("hf-hub:not a repo")


def test_checkpoint_module_is_a_leaf() -> None:
    code = ("import sys, imagefm.checkpoint\n"
            "bad = [m for m in sys.modules if m.startswith(('imagefm.models', 'imagefm.convert',"
            " 'imagefm.loading', 'transformers'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_parameters_are_assigned_not_copied(tmp_path: Path) -> None:
    """A strict load builds on the meta device and takes the checkpoint's tensors: nothing is
    left on meta, and the bf16 weights are the ones read (no float32 detour)."""
    reference = _tiny_hf_clip()
    reference.save_pretrained(tmp_path / "clip")
    model = imagefm.load(tmp_path / "clip", dtype="bfloat16")
    assert not any(p.is_meta for p in model.parameters())
    state = json.loads((tmp_path / "clip" / "config.json").read_text())
    assert state["model_type"] == "clip"
