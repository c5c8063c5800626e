"""Every architecture imagefm reads, by Hub id from our Hub on 127.0.0.1 (tests/hub_server.py):
downloaded into the cache, then reloaded offline with no request, each time the same model as a
load of the local directory (whose parity with the reference its own test file checks) and the
same processor. The repos are the tiny random references the parity tests build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import test_idefics3 as idefics3_test  # noqa: E402
import test_llava_onevision as onevision_test  # noqa: E402
import test_parity_siglip2 as siglip2_test  # noqa: E402
import test_qwen2_5_vl as qwen2_5_vl_test  # noqa: E402
import test_qwen2_vl as qwen2_vl_test  # noqa: E402
import test_qwen3 as qwen3_test  # noqa: E402

import imagefm  # noqa: E402
from imagefm.hub import HubError  # noqa: E402


def _naflex(factory: pytest.TempPathFactory) -> Path:
    directory = factory.mktemp("naflex")
    siglip2_test._naflex_reference(directory,
                                   siglip2_test.gemma_tokenizer_json.__wrapped__(factory))
    return directory


def _qwen3(factory: pytest.TempPathFactory) -> Path:
    return qwen3_test._saved(factory.mktemp("qwen3"))[1]


def _smolvlm(factory: pytest.TempPathFactory) -> Path:
    directory = factory.mktemp("smolvlm")
    idefics3_test._build(directory, "smolvlm")
    return directory


BUILDERS: dict[str, Callable[[pytest.TempPathFactory], Path]] = {
    "siglip2-naflex": _naflex,
    "qwen3": _qwen3,
    "qwen2-vl": lambda f: qwen2_vl_test.reference.__wrapped__(f)[2],
    "qwen2.5-vl": lambda f: qwen2_5_vl_test.reference.__wrapped__(f)[2],
    "llava-onevision": lambda f: onevision_test.reference.__wrapped__(f)[2],
    "smolvlm": _smolvlm,
}


def _same_model(ours: torch.nn.Module, expected: torch.nn.Module) -> None:
    assert type(ours) is type(expected) and ours.config == expected.config
    state, reference = ours.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_family_loads_by_hub_id_then_offline(family: str, hub,
                                                   tmp_path_factory: pytest.TempPathFactory
                                                   ) -> None:
    local = BUILDERS[family](tmp_path_factory)
    expected = imagefm.load(local)
    hub.add_repo(f"org/{family}", local)
    model, processor = imagefm.load(f"org/{family}", processor=True)
    _same_model(model, expected)
    if family == "qwen3":  # a language model's processor is its tokenizer (none in this repo)
        assert processor is model.tokenizer
    else:
        assert type(processor) is type(imagefm.load_processor(local))
    hub.clear_log()
    with hub.offline(stop_server=False):
        again = imagefm.load(f"hf-hub:org/{family}", dtype="bfloat16")
    assert hub.requests == []
    assert {p.dtype for p in again.parameters() if p.is_floating_point()} == {torch.bfloat16}
    _same_model(again.float(), expected.to(torch.bfloat16).float())


def test_gguf_repo_needs_a_filename_when_it_holds_several(hub, tmp_path: Path) -> None:
    reference = qwen3_test._reference()
    repo = tmp_path / "repo"
    repo.mkdir()
    qwen3_test._write_qwen3_gguf(repo / "model-f32.gguf", reference)
    qwen3_test._write_qwen3_gguf(repo / "model-f16.gguf", reference, matrix_type="F16")
    hub.add_repo("org/qwen3-gguf", repo)
    with pytest.raises(HubError, match=r"2 GGUF files.*filename="):
        imagefm.load("org/qwen3-gguf")
    model = imagefm.load("org/qwen3-gguf", filename="model-f32.gguf")
    _same_model(model, imagefm.load(repo / "model-f32.gguf"))
    assert hub.downloaded("org/qwen3-gguf") == ["model-f32.gguf"]  # not the other one
    with pytest.raises(HubError, match="no file 'nope.gguf'"):
        imagefm.load("org/qwen3-gguf", filename="nope.gguf")


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-onevision", "smolvlm"])
def test_info_describes_every_vlm_family(family: str, tmp_path_factory) -> None:
    from typer.testing import CliRunner

    from imagefm.cli import app

    local = BUILDERS[family](tmp_path_factory)
    result = CliRunner().invoke(app, ["info", str(local)])
    assert result.exit_code == 0, result.output
    model = imagefm.load(local)
    assert f"{sum(p.numel() for p in model.parameters()):,}" in result.output
    assert "vision tower" in result.output and "language model" in result.output
