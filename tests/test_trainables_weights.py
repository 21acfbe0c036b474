"""ImageNet weights: the torch hub cache, the offline import path with real weights, clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.errors import UserError
from trainables import weights
from trainables.models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # Any download attempt must fail at once, as on an offline machine (no waiting on a network).
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_missing_weights_are_listed_without_network(empty_torch_home):
    missing = weights.missing_weights(["baseline_bn", "resnet18", "mobilenet_v2", "resnet18"])
    assert missing == [("resnet18", "resnet18-f37072fd.pth", str(empty_torch_home / "resnet18-f37072fd.pth")),
                       ("mobilenet_v2", "mobilenet_v2-b0353104.pth",
                        str(empty_torch_home / "mobilenet_v2-b0353104.pth"))]


def test_building_without_cached_weights_is_a_one_line_error(empty_torch_home):
    with pytest.raises(UserError) as e:
        build_model("resnet18", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "resnet18-f37072fd.pth" in msg and str(empty_torch_home) in msg
    assert "python -m trainables.weights import FILE --backbone resnet18" in msg


def test_import_rejects_a_file_of_the_wrong_architecture(empty_torch_home, tmp_path):
    bogus = tmp_path / "resnet18-f37072fd.pth"
    torch.save(build_model("baseline", pretrained=False).state_dict(), bogus)
    with pytest.raises(UserError, match="does not load strictly into resnet18"):
        weights.import_weights(bogus, "resnet18")
    assert not (empty_torch_home / "resnet18-f37072fd.pth").exists()     # nothing half-imported
    with pytest.raises(UserError, match="not found"):
        weights.import_weights(tmp_path / "nope.pth", "resnet18")


def _offline_file() -> Path:
    try:
        return weights.offline_mobilenet_file()
    except UserError as e:
        pytest.skip(str(e))


def test_real_offline_weights_import_and_load_strictly(empty_torch_home):
    src = _offline_file()
    import torchvision
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(src, map_location="cpu", weights_only=True), strict=True)

    dest = weights.import_weights(src, "mobilenet_v2")
    assert dest == empty_torch_home / "mobilenet_v2-b0353104.pth"
    assert weights._sha256_prefix_ok(dest, dest.name)          # torchvision's own file, byte for byte
    assert weights.missing_weights(["mobilenet_v2"]) == []
    model = build_model("mobilenet_v2", pretrained=True, unfreeze_depth=0)
    # The pretrained first conv is in the model, not a random init.
    ref = torch.load(src, map_location="cpu", weights_only=True)["features.0.0.weight"]
    assert torch.equal(model.net.features[0][0].weight, ref)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    # A saved fine-tuned model reloads with its ImageNet normalisation, without needing the weights.
    from trainables.train import load_model, save_model
    path = save_model(empty_torch_home.parent / "m.pt", model, {"backbone": "mobilenet_v2", "unfreeze_depth": 0})
    (empty_torch_home / "mobilenet_v2-b0353104.pth").unlink()
    loaded, _ = load_model(path, device="cpu")
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.std, model.std)


def test_cli_import_offline_then_list(tmp_path, monkeypatch, capsys):
    _offline_file()
    env = {"TORCH_HOME": str(tmp_path / "th"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "trainables.weights", "import-offline"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "th" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights.main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["mobilenet_v2"].split()[1:] == ["mobilenet_v2-b0353104.pth", "cached"]
    assert rows["resnet18"].split()[1:] == ["resnet18-f37072fd.pth", "missing"]
    assert weights.main(["import", str(tmp_path / "none.pth"), "--backbone", "resnet18"]) == 2
    assert capsys.readouterr().err.startswith("error: weights file")


# --- Downloading missing weights (the search's pre-flight), tested against a real HTTP server on 127.0.0.1 ---

class _Mirror:
    """A folder served over HTTP on 127.0.0.1, counting the GET requests it answers."""

    def __init__(self, folder: Path):
        import functools
        import http.server
        import threading

        mirror = self
        self.requests: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/models"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """Serve `<folder>/models/<file>` and point $PCAM_TUNE_WEIGHTS_URL at it; TORCH_HOME is a temporary folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = tmp_path / "served"
    (served / "models").mkdir(parents=True)
    m = _Mirror(served)
    monkeypatch.setenv(weights.MIRROR_ENV, m.url)
    m.folder = served / "models"
    yield m
    m.close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens, connect is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


def test_missing_weights_are_downloaded_once_with_the_hash_checked(mirror, capsys):
    src = _offline_file()
    (mirror.folder / src.name).symlink_to(src)
    assert weights.download_missing(["baseline_bn", "mobilenet_v2"], progress=False) == []
    dest = weights.checkpoint_dir() / "mobilenet_v2-b0353104.pth"
    assert dest.read_bytes() == src.read_bytes()
    assert mirror.requests == ["/models/mobilenet_v2-b0353104.pth"]
    assert f"{mirror.url}/mobilenet_v2-b0353104.pth" in capsys.readouterr().out
    assert weights.download_missing(["mobilenet_v2"], progress=False) == []  # cached now: no second request
    assert len(mirror.requests) == 1
    model = build_model("mobilenet_v2", pretrained=True, unfreeze_depth=0)
    ref = torch.load(src, map_location="cpu", weights_only=True)["features.0.0.weight"]
    assert torch.equal(model.net.features[0][0].weight, ref)


def test_a_corrupt_download_fails_the_hash_check_and_leaves_nothing(mirror):
    data = bytearray(_offline_file().read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    (mirror.folder / "mobilenet_v2-b0353104.pth").write_bytes(bytes(data))
    [(name, filename, path, err)] = weights.download_missing(["mobilenet_v2"], progress=False)
    assert (name, filename) == ("mobilenet_v2", "mobilenet_v2-b0353104.pth")
    assert "invalid hash value" in weights.download_error(err)
    assert list(weights.checkpoint_dir().iterdir()) == []  # neither the file nor a .partial left behind
    with pytest.raises(UserError, match="downloading it failed .RuntimeError: invalid hash value"):
        build_model("mobilenet_v2", pretrained=True)  # a trial's own download checks the hash the same way


def test_search_preflight_downloads_then_explains_an_offline_failure(mirror, monkeypatch):
    from search.plan import check_weights
    from search.spaces import SpaceOptions, get_space, resolve_backbones

    src = _offline_file()
    (mirror.folder / src.name).symlink_to(src)
    space, opts = get_space("backbones"), SpaceOptions(backbones=("baseline_bn", "mobilenet_v2", "resnet18"))
    backbones = resolve_backbones(space, opts)
    with pytest.raises(UserError) as e:  # the mirror has mobilenet_v2 only: resnet18's download fails (404)
        check_weights(space, backbones, opts)
    msg = str(e.value)
    assert "\n" not in msg and "1 backbone(s)" in msg and "HTTPError 404" in msg
    assert "resnet18-f37072fd.pth" in msg and str(weights.checkpoint_dir()) in msg
    assert "--backbones baseline_bn,mobilenet_v2" in msg and "--no-pretrained" in msg
    assert weights.missing_weights(["mobilenet_v2"]) == []  # what could be downloaded was
    opts = SpaceOptions(backbones=("baseline_bn", "mobilenet_v2"))
    check_weights(space, resolve_backbones(space, opts), opts)  # nothing missing now: passes, no request
    assert mirror.requests == ["/models/mobilenet_v2-b0353104.pth", "/models/resnet18-f37072fd.pth"]

    (weights.checkpoint_dir() / src.name).unlink()
    monkeypatch.setenv(weights.MIRROR_ENV, _closed_port_url())  # offline: the connection is refused
    with pytest.raises(UserError) as e:
        check_weights(space, resolve_backbones(space, opts), opts)
    msg = str(e.value)
    assert "\n" not in msg and "URLError" in msg and "mobilenet_v2-b0353104.pth" in msg
    assert "python -m trainables.weights import FILE --backbone NAME" in msg
