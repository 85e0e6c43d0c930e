"""`--model-id ORG/NAME` that is not in the cache: the launcher downloads it before any shard starts.

Against a stand-in hub endpoint (tests/hub_standin.py, reached through
HF_ENDPOINT as the real hub is): the launcher fetches config, tokenizer and
safetensors only, at the revision asked, then serves; offline
(HF_HUB_OFFLINE=1) it refuses at once, naming the model and download-weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from hub_standin import HubStandIn

from .conftest import ServerProcess, processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LAUNCHER = Path(sys.executable).parent / "text-generation-launcher"


@pytest.fixture
def hub(tiny_llama, tmp_path):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(tiny_llama, remote)
    (remote / "pytorch_model.bin").write_bytes(b"not needed: the safetensors are there")
    (remote / "training_args.bin").write_bytes(b"x")
    standin = HubStandIn().start()
    standin.repos["org/tiny"] = remote
    yield standin
    standin.stop()


def test_an_uncached_hub_id_is_downloaded_then_served(hub, tmp_path):
    cache = tmp_path / "hub-cache"
    env = {"HF_ENDPOINT": hub.url, "HUGGINGFACE_HUB_CACHE": str(cache), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "0"}
    server = ServerProcess(tmp_path, ["--model-id", "org/tiny", "--revision", "main"], env).start()
    try:
        # everything the checkpoint needs (config, tokenizer, chat template, safetensors), no .bin file
        wanted = sorted(f"org/tiny/{p.name}" for p in hub.repos["org/tiny"].iterdir() if p.suffix != ".bin")
        assert sorted(hub.downloads) == wanted and "org/tiny/model.safetensors" in wanted
        info = requests.get(f"http://127.0.0.1:{server.http_port}/info", timeout=10).json()
        assert info["model_id"] == "org/tiny"
        log = server.log_path.read_text()
        assert "org/tiny at revision main is not in the Hugging Face cache: downloading it first" in log
        assert f"Fetching {len(wanted)} files" in log  # huggingface_hub progress bar
        assert log.index("downloading it first") < log.index("Starting shard 0")
    finally:
        assert server.stop() == 0, server.log_tail()


def test_offline_an_uncached_hub_id_is_refused_naming_download_weights(hub, tmp_path):
    cache = tmp_path / "empty-cache"
    env = {"HF_ENDPOINT": hub.url, "HUGGINGFACE_HUB_CACHE": str(cache), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    done = subprocess.run([str(LAUNCHER), "--model-id", "org/tiny", "--shard-uds-path", str(tmp_path / "s" / "shard")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "org/tiny" in done.stderr and "download-weights org/tiny" in done.stderr
    assert "Starting shard" not in done.stderr and not hub.downloads
    assert time.monotonic() - started < 60
    assert not processes_mentioning(str(tmp_path / "s"))
