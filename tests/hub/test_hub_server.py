"""The test Hub (hub_server.py) driven by the unmodified huggingface_hub client and by stock diffusers."""

import json
import re
import time
import urllib.request
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from hub_server import HubServer
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import load_file, save_file


COMMIT_ID = re.compile(r"[0-9a-f]{40}")


def write_model_folder(folder, weight: float):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden": 4, "weight": weight}))
    save_file({"weight": torch.full((4, 4), weight)}, folder / "model.safetensors")
    (folder / "docs").mkdir(exist_ok=True)
    (folder / "docs" / "notes.txt").write_text(f"weight {weight}\n")


def test_create_repo_conflict_and_exist_ok(hub):
    api = HfApi()
    url = api.create_repo("ns/created")
    assert url == f"{hub.url}/ns/created"
    assert url.repo_id == "ns/created"

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("ns/created")
    assert conflict.value.response.status_code == 409

    assert api.create_repo("ns/created", exist_ok=True) == url
    # A new repo holds the Hub's initial commit with .gitattributes.
    assert api.list_repo_files("ns/created") == [".gitattributes"]
    assert COMMIT_ID.fullmatch(api.model_info("ns/created").sha)


def test_commits_revisions_and_downloads(hub, tmp_path):
    api = HfApi()
    api.create_repo("ns/model")
    folder = tmp_path / "model"
    write_model_folder(folder, weight=1.0)
    first = api.upload_folder(repo_id="ns/model", folder_path=folder, commit_message="first")

    write_model_folder(folder, weight=2.0)
    second = api.create_commit(
        repo_id="ns/model",
        operations=[
            CommitOperationAdd("model.safetensors", folder / "model.safetensors"),
            CommitOperationAdd("config.json", folder / "config.json"),
            CommitOperationDelete("docs/"),
        ],
        commit_message="second",
    )
    assert COMMIT_ID.fullmatch(first.oid) and COMMIT_ID.fullmatch(second.oid)
    assert first.oid != second.oid
    assert first.commit_url == f"{hub.url}/ns/model/commit/{first.oid}"

    # Listings: head and the first commit, by model_info, list_repo_files and the recursive tree.
    info = api.model_info("ns/model")
    assert info.sha == second.oid
    assert sorted(sibling.rfilename for sibling in info.siblings) == [
        ".gitattributes",
        "config.json",
        "model.safetensors",
    ]
    assert api.model_info("ns/model", revision=first.oid).sha == first.oid
    old_files = [".gitattributes", "config.json", "docs/notes.txt", "model.safetensors"]
    assert api.list_repo_files("ns/model", revision=first.oid) == old_files
    tree = {entry.path: entry for entry in api.list_repo_tree("ns/model", revision=first.oid, recursive=True)}
    assert sorted(tree) == [".gitattributes", "config.json", "docs", "docs/notes.txt", "model.safetensors"]
    assert tree["model.safetensors"].size == (folder / "model.safetensors").stat().st_size
    assert [entry.path for entry in api.list_repo_tree("ns/model", "docs", revision=first.oid)] == ["docs/notes.txt"]

    # Downloads: the branch serves the new version, the first commit id keeps serving the old one.
    latest = load_file(hf_hub_download("ns/model", "model.safetensors"))["weight"]
    assert torch.equal(latest, torch.full((4, 4), 2.0))
    snapshot = snapshot_download("ns/model", revision=first.oid)
    assert torch.equal(load_file(f"{snapshot}/model.safetensors")["weight"], torch.full((4, 4), 1.0))
    assert json.loads(Path(snapshot, "config.json").read_text())["weight"] == 1.0
    assert Path(snapshot, "docs", "notes.txt").read_text() == "weight 1.0\n"
    assert f"/snapshots/{first.oid}" in snapshot
    assert str(hub.cache_dir) in snapshot

    # Re-uploading unchanged files makes no commit: the server reports the stored oids and the client skips them.
    unchanged = api.upload_file(path_or_fileobj=folder / "config.json", path_in_repo="config.json", repo_id="ns/model")
    assert unchanged.oid == second.oid


def test_resolve_headers_and_range(hub, tmp_path):
    api = HfApi()
    api.create_repo("ns/ranged")
    content = bytes(range(256)) * 4
    commit = api.upload_file(path_or_fileobj=content, path_in_repo="data.bin", repo_id="ns/ranged")

    metadata = get_hf_file_metadata(hf_hub_url("ns/ranged", "data.bin"))
    assert metadata.commit_hash == commit.oid
    assert metadata.size == len(content)
    assert metadata.etag == git_hash(content)

    request = urllib.request.Request(
        hf_hub_url("ns/ranged", "data.bin", revision=commit.oid),
        headers={"Range": "bytes=1000-", "Authorization": f"Bearer {hub.token}"},
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-1023/{len(content)}"
        assert response.read() == content[1000:]


def test_typed_errors(hub):
    api = HfApi()
    api.create_repo("ns/present")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("ns/absent")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("ns/absent", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("ns/present", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("ns/present", ".gitattributes", revision="0" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("ns/present", "missing.json")
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("missing.json", repo_id="ns/present")


def test_wrong_or_missing_token_is_refused(hub):
    HfApi().create_repo("ns/guarded")
    with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as wrong:
        HfApi(token="hf_wrong").create_repo("ns/other")
    assert wrong.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as wrong_download:
        hf_hub_download("ns/guarded", ".gitattributes", token="hf_wrong")
    assert wrong_download.value.response.status_code == 401
    # Anonymous reads are allowed, anonymous writes are not, as on the Hub.
    assert HfApi(token=False).list_repo_files("ns/guarded") == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(token=False).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="ns/guarded")
    assert anonymous.value.response.status_code == 401


def test_stopped_server_is_a_connection_error(hub):
    HfApi().create_repo("ns/gone")
    HfApi().create_repo("ns/never-downloaded")
    cached = hf_hub_download("ns/gone", ".gitattributes")
    hub.stop()
    start = time.perf_counter()
    with pytest.raises(httpx2.ConnectError):
        HfApi().create_repo("ns/gone", exist_ok=True)
    with pytest.raises(httpx2.ConnectError):
        HfApi().model_info("ns/gone")
    with pytest.raises(LocalEntryNotFoundError, match="check your internet connection"):
        snapshot_download("ns/never-downloaded")
    # A file already in the cache is still served; (an uncached one makes hf_hub_download retry for ~23 s).
    assert hf_hub_download("ns/gone", ".gitattributes") == cached
    assert time.perf_counter() - start < 5


def test_restarted_server_keeps_its_repos(hub, tmp_path):
    HfApi().create_repo("ns/kept")
    commit = HfApi().upload_file(path_or_fileobj=b"kept", path_in_repo="kept.txt", repo_id="ns/kept")
    hub.stop()
    restarted = HubServer(tmp_path / "hub-data", token=hub.token).start()
    try:
        api = HfApi(endpoint=restarted.url)
        assert api.model_info("ns/kept").sha == commit.oid
        assert api.list_repo_files("ns/kept") == [".gitattributes", "kept.txt"]
    finally:
        restarted.stop()


@pytest.fixture
def pipeline(tiny_stock_unet) -> DDPMPipeline:
    return DDPMPipeline(unet=tiny_stock_unet, scheduler=DDPMScheduler(num_train_timesteps=100))


def public_config(component) -> dict:
    return {key: value for key, value in component.config.items() if not key.startswith("_")}


def sample(pipeline: DDPMPipeline) -> np.ndarray:
    return pipeline(generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="np").images


def test_diffusers_pipeline_push_and_load(hub, tmp_path, pipeline):
    pipeline.push_to_hub("ns/tiny-ddpm")
    pipeline.save_pretrained(tmp_path / "local")

    files = HfApi().list_repo_files("ns/tiny-ddpm")
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert "scheduler/scheduler_config.json" in files

    loaded = DDPMPipeline.from_pretrained("ns/tiny-ddpm")
    assert loaded.name_or_path == "ns/tiny-ddpm"
    assert (hub.cache_dir / "models--ns--tiny-ddpm" / "snapshots").is_dir()
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    assert public_config(loaded.scheduler) == public_config(pipeline.scheduler)
    # Same images as the same pipeline loaded from a local folder (from_pretrained also puts the model in eval mode).
    local = DDPMPipeline.from_pretrained(tmp_path / "local")
    np.testing.assert_array_equal(sample(loaded), sample(local))


def test_model_card_round_trip(hub):
    HfApi().create_repo("ns/carded")
    card = ModelCard.from_template(
        ModelCardData(license="apache-2.0", library_name="diffusers", tags=["sculptdiff", "unconditional"]),
        model_description="A tiny test model.",
    )
    card.push_to_hub("ns/carded")

    loaded = ModelCard.load("ns/carded")
    assert loaded.data.license == "apache-2.0"
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.tags == ["sculptdiff", "unconditional"]
    assert "A tiny test model." in loaded.text
