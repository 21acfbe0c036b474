"""timm/hf-hub backbones' weights: a local HTTP server on 127.0.0.1 stands in for the Hugging Face hub
($HF_ENDPOINT), with huggingface_hub's real download code; importing local safetensors files for offline machines."""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from datasets.errors import UserError
from trainables import hub, weights
from trainables.models import build_model

TIMM_NAME = "timm/test_vit"  # a 0.3M-parameter ViT in timm's registry; its hub repo is timm/test_vit.r160_in1k
REPO = "timm/test_vit.r160_in1k"


def _state_file(tmp_path: Path, arch: str, name: str = "model.safetensors") -> Path:
    """A safetensors file shaped like timm's published weights of ``arch`` (random values, 1000-class head)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = timm.create_model(arch, pretrained=False)
    path = tmp_path / arch / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture
def isolated_hub(tmp_path, monkeypatch):
    """Empty torch hub dir and Hugging Face cache; no token."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return tmp_path


class FakeHub:
    """Serves /<org>/<repo>/resolve/<rev>/<file> like the hub: HEAD with ETag = sha256 and X-Repo-Commit, GET the
    bytes; repos in ``refuse`` answer with that HTTP status (401/403: gated)."""

    def __init__(self, files: dict[str, bytes], refuse: dict[str, int], etags: dict[str, str] | None = None):
        outer = self
        self.files, self.refuse, self.etags, self.gets = files, refuse, etags or {}, []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body: bool):
                parts = self.path.split("?")[0].strip("/").split("/")
                repo, fname = "/".join(parts[:2]), parts[-1]
                if repo in outer.refuse:
                    status, code = (outer.refuse[repo], "GatedRepo") if isinstance(outer.refuse[repo], int) \
                        else outer.refuse[repo]
                    self.send_response(status)
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", "Access to this repo is restricted")
                    self.end_headers()
                    return
                data = outer.files.get(f"{repo}/{fname}")
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                etag = outer.etags.get(f"{repo}/{fname}", hashlib.sha256(data).hexdigest())
                self.send_response(200)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    outer.gets.append(fname)
                    self.wfile.write(data)

            def do_HEAD(self):
                self._answer(False)

            def do_GET(self):
                self._answer(True)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(isolated_hub, monkeypatch):
    served = _state_file(isolated_hub, "test_vit").read_bytes()
    refuse = {"MahmoodLab/UNI2-h": 401, "paige-ai/Virchow2": 403, "MahmoodLab/UNI2-hh": (401, "RepoNotFound")}
    hub_server = FakeHub({f"{REPO}/model.safetensors": served}, refuse=refuse)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    yield hub_server, served
    hub_server.close()


def test_gated_repository_is_one_line_naming_the_repo_its_page_and_hf_token(fake_hub):
    for name, repo, code in (("hf-hub:MahmoodLab/UNI2-h", "MahmoodLab/UNI2-h", 401),
                             ("hf-hub:paige-ai/Virchow2", "paige-ai/Virchow2", 403)):
        failed = weights.download_missing([name], progress=False)
        assert [(b, f) for b, f, _, _ in failed] == [(name, "model.safetensors")]
        msg = str(failed[0][3])
        assert "\n" not in msg and repo in msg and f"https://huggingface.co/{repo}" in msg and "HF_TOKEN" in msg
        assert str(code) in msg and "no HF_TOKEN is set" in msg


def test_a_misspelt_repository_is_not_told_to_request_access(fake_hub):
    """The hub answers a name it does not know with 401 RepoNotFound (as for a private repo): the line says both."""
    failed = weights.download_missing(["hf-hub:MahmoodLab/UNI2-hh"], progress=False)
    msg = str(failed[0][3])
    assert "\n" not in msg and "MahmoodLab/UNI2-hh" in msg and "not found" in msg and "check the name" in msg
    assert "refused access" not in msg and "HF_TOKEN" in msg


def test_served_safetensors_is_downloaded_hash_checked_then_loaded_offline(fake_hub, monkeypatch):
    server, served = fake_hub
    assert weights.missing_weights([TIMM_NAME]) == [(TIMM_NAME, "model.safetensors", pytest.approx(
        weights.missing_weights([TIMM_NAME])[0][2]))]
    assert weights.download_missing([TIMM_NAME], progress=False) == []
    assert server.gets == ["model.safetensors"] and weights.missing_weights([TIMM_NAME]) == []
    local = hub.local_weights(hub.hub_model(TIMM_NAME))
    assert local.read_bytes() == served and hub.weights_id(local) == hashlib.sha256(served).hexdigest()
    # Trials and refits read the cache only: the server going away changes nothing.
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    model = build_model(TIMM_NAME, pretrained=True, unfreeze_depth=0)
    from safetensors.torch import load_file
    want = load_file(str(local))["blocks.0.attn.qkv.weight"]
    assert torch.equal(model.net.features.blocks[0].attn.qkv.weight, want)
    assert server.gets == ["model.safetensors"]  # downloaded once


def test_a_file_whose_sha256_is_not_the_hubs_is_removed_in_one_line(isolated_hub, monkeypatch):
    served = _state_file(isolated_hub, "test_vit").read_bytes()
    lying = FakeHub({f"{REPO}/model.safetensors": served}, refuse={},
                    etags={f"{REPO}/model.safetensors": "0" * 64})
    monkeypatch.setenv("HF_ENDPOINT", lying.url)
    try:
        with pytest.raises(UserError) as e:
            hub.download(hub.hub_model(TIMM_NAME))
    finally:
        lying.close()
    assert "sha256" in str(e.value) and "\n" not in str(e.value)
    assert hub.local_weights(hub.hub_model(TIMM_NAME)) is None


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_offline_says_how_to_import_a_downloaded_file(isolated_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    with pytest.raises(UserError) as e:
        build_model(TIMM_NAME, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and REPO in msg
    assert f"python -m trainables.weights import model.safetensors --backbone {TIMM_NAME}" in msg
    with pytest.raises(UserError) as e:
        hub.download(hub.hub_model("hf-hub:bioptimus/H-optimus-0"))
    assert "--config config.json" in str(e.value) and "https://huggingface.co/bioptimus/H-optimus-0" in str(e.value)


def test_import_a_local_safetensors_file_and_refuse_a_mismatched_one(isolated_hub, capsys):
    good = _state_file(isolated_hub, "test_vit")
    assert weights.main(["import", str(good), "--backbone", TIMM_NAME]) in (None, 0)
    assert "imported" in capsys.readouterr().out
    m = hub.hub_model(TIMM_NAME)
    assert hub.local_weights(m) == m.import_dir / "model.safetensors" and weights.missing_weights([TIMM_NAME]) == []
    model = build_model(TIMM_NAME, pretrained=True)
    from safetensors.torch import load_file
    assert torch.equal(model.net.features.patch_embed.proj.weight, load_file(str(good))["patch_embed.proj.weight"])

    wrong = _state_file(isolated_hub, "test_efficientnet")
    with pytest.raises(UserError) as e:
        weights.import_weights(wrong, TIMM_NAME)
    assert "does not load strictly into timm/test_vit" in str(e.value) and "\n" not in str(e.value)
    assert hub.local_weights(m).read_bytes() == good.read_bytes()  # the good import stays
    assert weights.main(["import", str(wrong), "--backbone", TIMM_NAME]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_repository_timm_cannot_load_is_refused_in_one_line(isolated_hub):
    """Phikon-v2 is a transformers model: its config.json names no timm architecture."""
    import json

    cfg = isolated_hub / "config.json"
    cfg.write_text(json.dumps({"architectures": ["Dinov2Model"], "model_type": "dinov2"}))
    good = _state_file(isolated_hub, "test_vit")
    with pytest.raises(UserError) as e:
        weights.import_weights(good, "hf-hub:owkin/phikon-v2", config=cfg)
    assert "\n" not in str(e.value) and "architecture" in str(e.value)
    with pytest.raises(UserError) as e:
        weights.import_weights(good, "hf-hub:owkin/phikon-v2")
    assert "--config config.json" in str(e.value) and "\n" not in str(e.value)


def test_search_preflight_reports_every_failed_hub_backbone_with_its_fix(fake_hub):
    """Two gated repositories (401 and 403 from the local hub): the one line before Ray starts names both, each
    with its repository page and HF_TOKEN, and the backbones that can run."""
    from search.plan import check_weights
    from search.spaces import SpaceOptions, get_space, resolve_backbones

    gated = ("hf-hub:MahmoodLab/UNI2-h", "hf-hub:paige-ai/Virchow2")
    space, opts = get_space("backbones"), SpaceOptions(backbones=("baseline_bn", *gated))
    with pytest.raises(UserError) as e:
        check_weights(space, resolve_backbones(space, opts), opts)
    msg = str(e.value)
    assert "\n" not in msg and "2 backbone(s)" in msg
    for name, repo, code in ((gated[0], "MahmoodLab/UNI2-h", 401), (gated[1], "paige-ai/Virchow2", 403)):
        assert f"{name}: hub repository {repo} refused access ({code}; no HF_TOKEN is set): request access at " \
               f"https://huggingface.co/{repo}" in msg
    assert msg.count("export HF_TOKEN=") == 2 and "--backbones baseline_bn;" in msg and "--no-pretrained" in msg
