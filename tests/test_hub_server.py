"""The test Hub (tests/hub_server.py) answers huggingface_hub as the Hub does: the cache fills in
the Hub's layout, revisions pin, each error is the exception huggingface_hub raises for it, and
offline / unreachable behave as huggingface_hub documents. The loading tests build on this."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import errors  # noqa: E402

WEIGHTS = bytes(range(256)) * 8  # an "LFS" file: served through the CDN redirect
CONFIG = json.dumps({"model_type": "siglip", "architectures": ["SiglipModel"]})


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def repo(hub) -> str:
    hub.add_repo("org/tiny", {"config.json": CONFIG, "model.safetensors": WEIGHTS,
                              "pytorch_model.bin": b"pickle", "tokenizer/vocab.txt": "a\nb\n"})
    return "org/tiny"


def test_hf_hub_download_fills_the_cache_in_the_hub_layout(hub, repo):
    sha = hf.model_info(repo).sha
    config = Path(hf.hf_hub_download(repo, "config.json"))
    weights = Path(hf.hf_hub_download(repo, "model.safetensors"))

    assert config == hub.snapshot_dir(repo, sha) / "config.json"
    assert weights.read_bytes() == WEIGHTS and json.loads(config.read_text())["model_type"]
    storage = hub.home / "hub" / "models--org--tiny"
    assert (storage / "refs" / "main").read_text() == sha
    # blobs are named by ETag: the git blob sha1, or the sha256 for LFS files
    assert config.resolve() == storage / "blobs" / _git_blob_sha1(CONFIG.encode())
    assert weights.resolve() == storage / "blobs" / hashlib.sha256(WEIGHTS).hexdigest()
    assert hub.downloaded() == ["config.json", "model.safetensors"]
    cdn = [r for r in hub.log if r.server == "cdn"]
    assert [(r.method, r.filename, r.authorization) for r in cdn] == [
        ("GET", "model.safetensors", None)]  # the token never leaves the Hub


def test_snapshot_download_fetches_only_the_allowed_files(hub, repo):
    folder = Path(hf.snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))

    assert folder == hub.snapshot_dir(repo, hf.model_info(repo).sha)
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors"]
    assert sorted(hub.downloaded(repo)) == ["config.json", "model.safetensors"]
    assert ("GET", f"/api/models/{repo}/revision/main") in hub.requests
    assert hf.list_repo_files(repo) == ["config.json", "model.safetensors", "pytorch_model.bin",
                                        "tokenizer/vocab.txt"]


def test_byte_ranges_are_served_as_the_cdn_serves_them(hub):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    hub.add_repo("org/st", {"model.safetensors": save({"w": torch.zeros(3, 5)})})
    meta = hf.get_safetensors_metadata("org/st")  # a Range GET through the CDN redirect
    assert meta.files_metadata["model.safetensors"].tensors["w"].shape == [3, 5]
    assert [r.status for r in hub.log if r.server == "cdn"] == [206]


def test_a_folder_is_published_as_it_is(hub, tmp_path):
    src = tmp_path / "saved"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text(CONFIG)
    (src / "sub" / "w.safetensors").write_bytes(WEIGHTS)
    hub.add_repo("org/from-folder", src)

    folder = Path(hf.snapshot_download("org/from-folder"))
    assert (folder / "sub" / "w.safetensors").read_bytes() == WEIGHTS
    assert sorted(hf.list_repo_files("org/from-folder")) == ["config.json", "sub/w.safetensors"]


def test_revisions_pin_by_branch_tag_and_commit(hub):
    first = hub.add_repo("org/m", {"config.json": '{"v": 1}'}, tags=["v1.0"])
    second = hub.add_repo("org/m", {"config.json": '{"v": 2}', "extra.txt": "x"})
    dev = hub.add_repo("org/m", {"config.json": '{"v": 3}'}, revision="dev")

    def version(revision: str | None) -> int:
        path = hf.hf_hub_download("org/m", "config.json", revision=revision)
        return json.loads(Path(path).read_text())["v"]

    assert [version(r) for r in (None, "main", "v1.0", first, second, "dev", dev)] == [
        2, 2, 1, 1, 2, 3, 3]
    assert len({first, second, dev}) == 3 and all(len(s) == 40 for s in (first, second, dev))
    assert hf.model_info("org/m", revision="v1.0").sha == first
    assert hf.list_repo_files("org/m", revision=first) == ["config.json"]
    assert (Path(hf.snapshot_download("org/m", revision="v1.0")) / "config.json").read_text() \
        == '{"v": 1}'
    refs = hf.HfApi().list_repo_refs("org/m")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1.0": first}


def _raised(fn, *args, **kwargs) -> Exception:
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("call", ["hf_hub_download", "snapshot_download", "model_info"])
def test_each_hub_error_is_the_exception_huggingface_hub_raises(hub, repo, call):
    def run(repo_id: str, revision: str | None = None, filename: str = "config.json"):
        if call == "hf_hub_download":
            return hf.hf_hub_download(repo_id, filename, revision=revision)
        fn = getattr(hf, call)
        return fn(repo_id, revision=revision)

    # GatedRepoError subclasses RepositoryNotFoundError: check the exact class.
    missing = _raised(run, "org/nope")
    assert type(missing) is errors.RepositoryNotFoundError
    assert missing.response.status_code == 401  # anonymous: the Hub answers 401
    revision = _raised(run, repo, revision="no-such-branch")
    assert type(revision) is errors.RevisionNotFoundError and "no-such-branch" in str(revision)
    if call == "hf_hub_download":
        entry = _raised(run, repo, filename="nope.json")
        assert isinstance(entry, errors.RemoteEntryNotFoundError)
        assert isinstance(entry, errors.EntryNotFoundError)


def test_gated_and_private_repos_need_their_token(hub, monkeypatch):
    hub.add_repo("org/gated", {"config.json": CONFIG}, gated=True, token="hf_good")
    hub.add_repo("org/private", {"config.json": CONFIG}, private=True, token="hf_good")

    # gated: metadata and file list are public, files are not
    assert hf.model_info("org/gated").gated == "manual"
    assert hf.list_repo_files("org/gated") == ["config.json"]
    anonymous = _raised(hf.hf_hub_download, "org/gated", "config.json")
    assert type(anonymous) is errors.GatedRepoError and anonymous.response.status_code == 401
    wrong = _raised(hf.hf_hub_download, "org/gated", "config.json", token="hf_bad")
    assert type(wrong) is errors.GatedRepoError and wrong.response.status_code == 403
    assert type(_raised(hf.snapshot_download, "org/gated")) is errors.GatedRepoError
    assert Path(hf.hf_hub_download("org/gated", "config.json", token="hf_good")).is_file()
    bearer = [r.authorization for r in hub.log if r.status == 200 and r.filename]
    assert bearer[-1] == "Bearer hf_good"

    # private: looks missing without the token (401 anonymous, 404 with another token)
    assert type(_raised(hf.model_info, "org/private")) is errors.RepositoryNotFoundError
    other = _raised(hf.hf_hub_download, "org/private", "config.json", token="hf_bad")
    assert type(other) is errors.RepositoryNotFoundError and other.response.status_code == 404
    monkeypatch.setenv("HF_TOKEN", "hf_good")  # the token a user logs in with is read per call
    assert hf.model_info("org/private").private is True
    assert Path(hf.snapshot_download("org/private")).joinpath("config.json").is_file()


def test_offline_mode_serves_the_cache_with_no_request(hub, repo):
    folder = hf.snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"])
    hub.clear_log()

    with hub.offline(stop_server=False):
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hf.constants.is_offline_mode()
        assert hf.snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]) == folder
        assert Path(hf.hf_hub_download(repo, "config.json")).parent == Path(folder)
        # not cached: hf_hub_download says so; API calls refuse to go out
        assert type(_raised(hf.hf_hub_download, repo, "pytorch_model.bin")) \
            is errors.LocalEntryNotFoundError
        assert type(_raised(hf.model_info, repo)) is errors.OfflineModeIsEnabled
    assert hub.requests == []

    with hub.offline():  # the default also stops the server
        assert not hub.running
        assert Path(hf.hf_hub_download(repo, "model.safetensors")).read_bytes() == WEIGHTS
    assert hub.running and not hf.constants.is_offline_mode()
    assert "HF_HUB_OFFLINE" not in os.environ


def test_a_commit_sha_in_the_cache_needs_no_request(hub, repo):
    sha = hf.model_info(repo).sha
    hf.hf_hub_download(repo, "config.json", revision=sha)
    hub.clear_log()
    assert Path(hf.hf_hub_download(repo, "config.json", revision=sha)).is_file()
    assert hub.requests == []


def test_an_unreachable_hub_raises_or_falls_back_to_the_cache(hub, repo):
    # Observed (huggingface_hub 2.5): with nothing cached, downloads raise
    # LocalEntryNotFoundError caused by httpx's ConnectError, API calls raise the ConnectError.
    with hub.stopped():
        err = _raised(hf.hf_hub_download, repo, "config.json")
        assert type(err) is errors.LocalEntryNotFoundError
        assert type(err.__cause__).__name__ == "ConnectError"
        assert type(_raised(hf.snapshot_download, repo)) is errors.LocalEntryNotFoundError
        api_err = _raised(hf.model_info, repo)
        # httpx's ConnectError, which is no OSError: a loader must catch it by class
        assert type(api_err).__name__ == "ConnectError" and not isinstance(api_err, OSError)

    # Not offline but unreachable, with the files cached: huggingface_hub falls back to the
    # cache (refs/main names the snapshot) without an error.
    folder = hf.snapshot_download(repo, allow_patterns=["*.json"])
    with hub.stopped():
        assert Path(hf.hf_hub_download(repo, "config.json")).parent == Path(folder)
        assert hf.snapshot_download(repo, allow_patterns=["*.json"]) == folder
        # a file of that snapshot that was never downloaded: the cached tree listing tells
        partial = _raised(hf.snapshot_download, repo)
        assert type(partial) is errors.IncompleteSnapshotError


def test_pointing_huggingface_hub_at_the_server_is_undone(tmp_path):
    from hub_env import huggingface_hub_pointed_at
    from hub_server import HubServer
    from huggingface_hub.utils import _cache_manager

    before = (hf.constants.ENDPOINT, hf.constants.HF_HUB_CACHE, _cache_manager.HF_HUB_CACHE,
              hf.hf_api.api.endpoint, os.environ.get("HF_ENDPOINT"))
    with HubServer() as server, huggingface_hub_pointed_at(server, tmp_path / "home"):
        assert hf.constants.ENDPOINT == server.url == hf.hf_api.api.endpoint
        assert _cache_manager.HF_HUB_CACHE == str(tmp_path / "home" / "hub")
        assert os.environ["HF_HUB_CACHE"] == str(tmp_path / "home" / "hub")
        assert "HF_TOKEN" not in os.environ and hf.constants.HF_HUB_DISABLE_TELEMETRY
    assert before == (hf.constants.ENDPOINT, hf.constants.HF_HUB_CACHE,
                      _cache_manager.HF_HUB_CACHE, hf.hf_api.api.endpoint,
                      os.environ.get("HF_ENDPOINT"))
