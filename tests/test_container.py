"""The Dockerfile, built and run (slow; needs a Docker daemon, skipped without one).

    pytest -m slow tests/test_container.py
    IMAGEFM_DOCKER_BUILD_ARGS="--build-arg BASE_IMAGE=... --build-arg TORCH_SPEC=..." pytest ...

The image is built from this checkout, a tiny language model written by the test is mounted
read-only, and the container must: run as the non-root user, answer ``/healthz``, become
``healthy`` under Docker's own health check, and answer a chat completion through the
continuous-batching engine. docs/deploy.md says how the image was built on a machine without
registry access (the build arguments above).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "imagefm-test:latest"


def _docker_ready() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except OSError:
        return 0, b""


def _wait_for(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(2)
    return False


def _inspect(name: str, template: str) -> str:
    return subprocess.run(["docker", "inspect", "--format", template, name],
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    if not _docker_ready():
        pytest.skip("no Docker daemon")
    args = shlex.split(os.environ.get("IMAGEFM_DOCKER_BUILD_ARGS", ""))
    build = subprocess.run(["docker", "build", "-t", IMAGE, *args, str(ROOT)], capture_output=True,
                           text=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


def test_image_serves_a_mounted_model_as_a_non_root_user(image: str, tiny_llama_dir: Path
                                                         ) -> None:
    for path in [tiny_llama_dir, *tiny_llama_dir.iterdir()]:
        path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    name = f"imagefm-test-{os.getpid()}"
    run = subprocess.run(
        ["docker", "run", "-d", "--name", name, "-p", "127.0.0.1::8000",
         "--health-interval", "3s", "--health-start-period", "60s",
         "-v", f"{tiny_llama_dir}:/models/model:ro", image,
         "--model", "/models/model", "--chat-slots", "2"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    try:
        port = _inspect(name, '{{(index (index .NetworkSettings.Ports "8000/tcp") 0).HostPort}}')
        base = f"http://127.0.0.1:{port}"
        assert _wait_for(lambda: _get(base + "/healthz")[0] == 200, 120), \
            subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr[-2000:]
        user = subprocess.run(["docker", "exec", name, "id", "-u"], capture_output=True,
                              text=True).stdout.strip()
        assert user == "1000"
        assert _wait_for(lambda: _inspect(name, "{{.State.Health.Status}}") == "healthy", 60)
        request = urllib.request.Request(
            base + "/v1/chat/completions", method="POST",
            headers={"content-type": "application/json"},
            data=json.dumps({"messages": [{"role": "user", "content": "hello"}],
                             "max_tokens": 4, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        assert answer["object"] == "chat.completion"
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
