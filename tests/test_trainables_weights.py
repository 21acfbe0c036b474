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
