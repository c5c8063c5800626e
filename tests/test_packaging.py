"""Package hygiene: the licence file matches pyproject, py.typed ships, the dependency lower
bounds cover the APIs the code uses, TOML configs read on Python 3.10 (tomli)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "imagefm"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements() -> dict[str, Requirement]:
    return {Requirement(r).name.lower().replace("_", "-"): Requirement(r)
            for r in _pyproject()["project"]["dependencies"]}


def _lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert bounds, f"{requirement} has no lower bound"
    return max(bounds)


def test_licence_file_matches_pyproject() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub


def test_py_typed_ships_with_the_package() -> None:
    assert (SRC / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["imagefm"]


# Each torch API the code calls, with the first release that has it.
TORCH_APIS = {
    "enable_gqa=": "2.5",  # F.scaled_dot_product_attention (models/decoder.py)
    "get_total_norm": "2.6",  # torch.nn.utils (train/distributed.py, every training step)
    "clip_grads_with_norm_": "2.6",
    "from torch.distributed.fsdp import fully_shard": "2.6",  # public from 2.6
    "ignored_params=": "2.7",  # a fully_shard keyword from 2.7
}


def test_torch_lower_bound_covers_the_apis_the_code_uses() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in SRC.rglob("*.py"))
    bound = _lower_bound(_requirements()["torch"])
    used = {api: version for api, version in TORCH_APIS.items() if api in source}
    assert "enable_gqa=" in used  # the table still describes the code
    for api, version in used.items():
        assert bound >= Version(version), f"{api} needs torch>={version}; pyproject says {bound}"


def test_installed_versions_meet_the_lower_bounds() -> None:
    from importlib.metadata import PackageNotFoundError, version

    for name, requirement in _requirements().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            pytest.fail(f"runtime dependency {name} is not installed")
        assert installed >= _lower_bound(requirement), f"{name} {installed} < {requirement}"


def test_huggingface_hub_offers_what_loading_needs() -> None:
    assert "huggingface-hub" in _requirements()
    import huggingface_hub
    from huggingface_hub import errors  # public from 0.25, the lower bound

    assert callable(huggingface_hub.hf_hub_download)
    assert callable(huggingface_hub.snapshot_download)
    for name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                 "EntryNotFoundError", "LocalEntryNotFoundError"):
        assert issubclass(getattr(errors, name), Exception)


def test_tomli_only_where_tomllib_is_missing() -> None:
    tomli = _requirements()["tomli"]
    assert tomli.marker.evaluate({"python_version": "3.10"})
    assert not tomli.marker.evaluate({"python_version": "3.11"})


def test_toml_config_reads_without_tomllib(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("tomli")
    from imagefm.train.config import read_config_file

    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 300\nlr = 1e-3\n[data]\nrecipe = "이모지"\n',
                    encoding="utf-8")
    expected = read_config_file(path)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib now fails, as on 3.10
    with pytest.raises(ImportError):
        import tomllib  # noqa: F401
    assert read_config_file(path) == expected == {"train": {"steps": 300, "lr": 1e-3},
                                                   "data": {"recipe": "이모지"}}
    path.write_text("[train\n", encoding="utf-8")
    from imagefm.config import ConfigError

    with pytest.raises(ConfigError, match="cannot be parsed"):
        read_config_file(path)


def test_no_module_needs_tomllib_at_import() -> None:
    # tomllib is 3.11+: an unguarded import anywhere in the package breaks Python 3.10.
    for path in SRC.rglob("*.py"):
        for match in re.finditer(r"^( *)import tomllib$", path.read_text(encoding="utf-8"),
                                 re.MULTILINE):
            assert match.group(1), f"{path}: module-level import tomllib"
