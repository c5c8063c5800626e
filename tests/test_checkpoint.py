from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import imagefm
from imagefm.checkpoint import CheckpointError, atomic_write_text, load_state_dict_file
from imagefm.cli import app
from imagefm.loading import detect_format
from imagefm.models.dual_encoder import DualEncoder


def _tiny(name: str = "tiny") -> DualEncoder:
    return DualEncoder(imagefm.preset(name)).eval()


@pytest.mark.parametrize("name", ["tiny", "siglip-tiny"])
def test_save_and_load_round_trip(tmp_path: Path, name: str) -> None:
    model = _tiny(name)
    model.save_pretrained(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "imagefm.json").read_text())
    assert meta["architecture"] == "dual_encoder"
    assert meta["preprocess"]["image_size"] == 64
    loaded = imagefm.load(tmp_path / "ck")
    assert loaded.config == model.config and loaded.card == model.card
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 4096, (2, 32))
    torch.testing.assert_close(loaded(pixels, ids).logits_per_image,
                               model(pixels, ids).logits_per_image, atol=0, rtol=0)
    assert not list((tmp_path / "ck").glob("*.tmp")), "temporary files left behind"


def test_load_refuses_missing_and_unexpected_weights(tmp_path: Path) -> None:
    model = _tiny()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("text.norm_final.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="text.norm_final.weight"):
        imagefm.load(tmp_path)


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.bin"
    with open(bad, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_state_dict_file(bad)


def test_plain_tensor_pickle_is_read(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"a": torch.arange(3)}, path)
    assert torch.equal(load_state_dict_file(path)["a"], torch.arange(3))


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_text(target, "old")
    from imagefm.checkpoint import atomic_write

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_detect_format_explains_unknown_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="imagefm.json"):
        detect_format(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "nope")


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    _tiny().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "imagefm.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "imagefm.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer imagefm"):
        imagefm.load(tmp_path)


def test_cli_version_and_info(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and imagefm.__version__ in result.output
    _tiny().save_pretrained(tmp_path)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "2,181,121" in result.output  # parameter count of the tiny preset
    assert "resize shortest" in result.output and "bicubic" in result.output


def test_load_refuses_misshaped_weights(tmp_path: Path) -> None:
    _tiny().save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["image_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped \['image_proj.weight \(3, 3\)"):
        imagefm.load(tmp_path)


def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path: Path) -> None:
    """Not mkstemp's 0600: a server running as another user must be able to read a model."""
    import os
    import stat

    from imagefm.checkpoint import atomic_write_text

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = atomic_write_text(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(written).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
