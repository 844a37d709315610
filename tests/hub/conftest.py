"""Fixtures for the Hub tests: a Hub-compatible server on 127.0.0.1 (hub_server.py) and a client pointed at it.

The top-level conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported, and huggingface_hub reads its
settings at import time, so the `hub` fixture patches `huggingface_hub.constants` in this process and exposes the
environment (`hub.env`) that subprocesses need. Cache, token files and everything else huggingface_hub writes go
under `tmp_path`; the real ~/.cache/huggingface and any real token are never read or written.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub_server import HubServer
from huggingface_hub import constants, hf_api


HUB_TOKEN = "hf_sculptdiff_test_token"


@dataclass
class HubFixture:
    server: HubServer
    url: str
    token: str
    hf_home: Path
    env: dict[str, str]

    @property
    def cache_dir(self) -> Path:
        return self.hf_home / "hub"

    def stop(self):
        self.server.stop()


def hub_environment(url: str, hf_home: Path) -> dict[str, str]:
    """The environment of a process that talks to the test Hub at `url`, with its cache under `hf_home`."""
    env = {
        key: value
        for key, value in os.environ.items()
        # Settings that would send the client offline or to another cache, endpoint or token.
        if not key.startswith(("HF_", "HUGGINGFACE_")) and key not in ("TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME")
    }
    env.update(
        {
            "HF_ENDPOINT": url,
            "HF_TOKEN": HUB_TOKEN,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            # The `hf` CLI would otherwise ask PyPI for a newer version.
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "DIFFUSERS_VERBOSITY": "error",
            # A proxy from the environment must never see this traffic: it stays on 127.0.0.1.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def point_client_at(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):
    """Make the already imported huggingface_hub of this process behave as if started with `env`."""
    for key in [key for key in os.environ if key not in env]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    url, hf_home = env["HF_ENDPOINT"], env["HF_HOME"]
    old_home = constants.HF_HOME
    # Every path huggingface_hub derived from HF_HOME at import (cache, token, xet, assets, agent registry...).
    for name, value in list(vars(constants).items()):
        if isinstance(value, str) and value.startswith(old_home):
            monkeypatch.setattr(constants, name, hf_home + value[len(old_home) :])
    for name, value in {
        "HF_HUB_CACHE": os.path.join(hf_home, "hub"),
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": os.path.join(hf_home, "xet"),
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_OFFLINE": False,
    }.items():
        monkeypatch.setattr(constants, name, value)
    # The module-level HfApi behind `huggingface_hub.create_repo`, `upload_folder`, `model_info`... kept its endpoint.
    monkeypatch.setattr(hf_api.api, "endpoint", url)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubFixture:
    """A running test Hub (token `HUB_TOKEN`), with this process's huggingface_hub pointed at it."""
    server = HubServer(tmp_path / "hub-data", token=HUB_TOKEN).start()
    hf_home = tmp_path / "hf-home"
    env = hub_environment(server.url, hf_home)
    point_client_at(monkeypatch, env)
    yield HubFixture(server=server, url=server.url, token=HUB_TOKEN, hf_home=hf_home, env=env)
    if server.thread.is_alive():
        server.stop()
