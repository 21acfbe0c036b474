"""Weights from the Hugging Face hub for ``timm/<model>`` and ``hf-hub:<org>/<repo>`` backbones.

A backbone name says where its weights live: ``timm/<model>`` -> the hub repository of timm's pretrained config
for that model (e.g. ``timm/mobilenetv2_100.ra_in1k``), ``hf-hub:<org>/<repo>`` -> that repository, whose
``config.json`` names the timm architecture. The files come through ``huggingface_hub`` (its cache,
``$HF_HOME/hub``; ``$HF_ENDPOINT`` a mirror; ``$HF_TOKEN`` for gated repositories), downloaded once by the search's
driver (the pre-flight, as torchvision's files are) and checked against the sha256 the hub gives as the file's
ETag; trials and refits then read the cache only (``local_files_only``), never the network.

Offline machines import a downloaded file instead (``python -m trainables.weights import model.safetensors
--backbone NAME``): it is kept under ``<torch hub dir>/pcam-tune-hub/<org>--<repo>/`` with its sha256, and is
found before the hub cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import UserError

TIMM_PREFIX, HUB_PREFIX = "timm/", "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's own order of preference
CONFIG_FILE = "config.json"
HUB_SITE = "https://huggingface.co"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_hub_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith((TIMM_PREFIX, HUB_PREFIX))


@dataclass(frozen=True)
class HubModel:
    """Where a hub backbone's files live."""
    name: str  # the backbone name as the user wrote it
    repo_id: str  # org/repo on the hub
    timm_name: str | None  # timm/<model>: timm's model name (with its pretrained tag); hf-hub: None (config.json)

    @property
    def page(self) -> str:
        return f"{HUB_SITE}/{self.repo_id}"

    @property
    def import_dir(self) -> Path:
        import torch
        return Path(torch.hub.get_dir()) / "pcam-tune-hub" / self.repo_id.replace("/", "--")


def hub_model(name: str) -> HubModel:
    """The repository of a ``timm/<model>`` or ``hf-hub:<org>/<repo>`` name; unknown models are one line."""
    if name.startswith(HUB_PREFIX):
        repo = name[len(HUB_PREFIX):].split("@")[0]
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
            raise UserError(f"backbone {name!r}: write hf-hub:<org>/<repo>, e.g. hf-hub:MahmoodLab/UNI2-h")
        return HubModel(name, repo, None)
    import timm
    model = name[len(TIMM_PREFIX):]
    arch = model.split(".")[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:6]}*")[:5]
        raise UserError(f"backbone {name!r}: timm has no model {arch!r}"
                        + (f" (close: {', '.join('timm/' + c for c in close)})" if close else "")
                        + "; see timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(model) if "." in model else timm.models.get_pretrained_cfg(arch)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return HubModel(name, repo or "", model)


def endpoint() -> str:
    """$HF_ENDPOINT read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or HUB_SITE


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ finding local files
def imported_weights(m: HubModel) -> Path | None:
    for f in WEIGHT_FILES:
        if (m.import_dir / f).is_file():
            return m.import_dir / f
    return None


def _cached(m: HubModel, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    if not m.repo_id:
        return None
    hit = try_to_load_from_cache(m.repo_id, filename)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def local_weights(m: HubModel) -> Path | None:
    """The weights file on this machine (imported first, then the hub cache), or None. No network."""
    found = imported_weights(m)
    if found is not None:
        return found
    for f in WEIGHT_FILES:
        hit = _cached(m, f)
        if hit is not None:
            return hit
    return None


def local_config(m: HubModel) -> Path | None:
    """An hf-hub repository's config.json on this machine (next to its weights), or None."""
    for folder in (m.import_dir,):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return _cached(m, CONFIG_FILE)


def weights_id(path: Path) -> str:
    """The sha256 of a weights file: the hub cache names blobs by it, an import writes it beside the file."""
    real = Path(os.path.realpath(path))
    if _SHA256.match(real.name):
        return real.name
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        return side.read_text().strip()
    digest = file_sha256(path)
    try:
        side.write_text(digest)
    except OSError:
        pass
    return digest


# ------------------------------------------------------------------------------------------ downloading
def _status(err: Exception) -> int | None:
    resp = getattr(err, "response", None)
    return getattr(resp, "status_code", None)


def offline_hint(m: HubModel) -> str:
    needs = f"{WEIGHT_FILES[0]}" + (f" and {CONFIG_FILE}" if m.timm_name is None else "")
    return (f"on a machine with access download {needs} from {m.page}/tree/main, then "
            f"`python -m trainables.weights import {WEIGHT_FILES[0]} --backbone {m.name}"
            + (f" --config {CONFIG_FILE}" if m.timm_name is None else "") + "`")


def hub_error(m: HubModel, err: Exception) -> str:
    """One line for a failed hub download: refused access (gated), missing, or unreachable (offline)."""
    from huggingface_hub import errors
    status = _status(err)
    if status == 401 and isinstance(err, errors.RepositoryNotFoundError) and not isinstance(err, errors.GatedRepoError):
        # The hub answers 401 "RepoNotFound" both for a misspelt name and for a private repository without a token.
        return (f"hub repository {m.repo_id} (for backbone {m.name}) was not found at {endpoint()}, or it is private "
                f"(401): check the name at {m.page}; a private or gated one needs access there and "
                f"`export HF_TOKEN=hf_...` (https://huggingface.co/settings/tokens)")
    if isinstance(err, errors.GatedRepoError) or status in (401, 403):
        token = "HF_TOKEN is set but was refused" if os.environ.get("HF_TOKEN") else "no HF_TOKEN is set"
        return (f"hub repository {m.repo_id} refused access ({status or 'gated'}; {token}): request access at "
                f"{m.page} while logged in, then `export HF_TOKEN=hf_...` (a token of that account, "
                f"https://huggingface.co/settings/tokens) and run again")
    if status == 404:
        return f"hub repository {m.repo_id} (for backbone {m.name}) or its weights file was not found at {endpoint()}"
    text = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return f"cannot download {m.repo_id} from {endpoint()} ({type(err).__name__}: {text}); {offline_hint(m)}"


def _download(m: HubModel, filename: str) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    # One HEAD without retries first: an offline machine or a refused token fails at once (hf_hub_download retries
    # connection errors for ~25 s), and the hub's ETag of an LFS file is its sha256, checked below.
    meta = get_hf_file_metadata(hf_hub_url(m.repo_id, filename, endpoint=endpoint()), timeout=30)
    path = Path(hf_hub_download(m.repo_id, filename, endpoint=endpoint(), etag_timeout=30))
    expected = (meta.etag or "").strip('"').lower()
    if _SHA256.match(expected):
        digest = file_sha256(path)
        if digest != expected:
            blob = Path(os.path.realpath(path))
            path.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
            raise UserError(f"{filename} of {m.repo_id} downloaded from {endpoint()} has sha256 {digest[:12]}..., "
                            f"the hub says {expected[:12]}...: removed; download it again")
    return path


def download(m: HubModel) -> Path:
    """Download the repository's weights (and, for hf-hub names, its config.json) into the hub cache; the local
    file when already there. Failures are one-line UserErrors (hub_error)."""
    found = local_weights(m)
    if found is not None and (m.timm_name is not None or local_config(m) is not None):
        return found
    if not m.repo_id:
        raise UserError(f"timm has no pretrained weights on the hub for {m.name}; use --no-pretrained (pretrained=False)")
    from huggingface_hub import errors
    try:
        if m.timm_name is None:
            _download(m, CONFIG_FILE)
        for i, f in enumerate(WEIGHT_FILES):
            try:
                return _download(m, f)
            except errors.HfHubHTTPError as e:
                if _status(e) != 404 or i == len(WEIGHT_FILES) - 1:  # a repository without this file: the next
                    raise
    except UserError:
        raise
    except Exception as e:  # HTTP errors, connection errors, offline (LocalEntryNotFoundError)
        raise UserError(hub_error(m, e)) from None
    raise AssertionError("unreachable")


def missing_message(m: HubModel) -> str:
    return (f"pretrained weights for {m.name} ({m.repo_id or 'no hub repository'}) are not on this machine: "
            f"the search downloads them before it starts, or {offline_hint(m)}; or use pretrained=False")


# ------------------------------------------------------------------------------------------ importing
def import_file(m: HubModel, file: Path, config: Path | None, check) -> Path:
    """Copy ``file`` (and an hf-hub repository's ``config``) into ``m.import_dir``; ``check()`` must then build the
    model from it (a strict load), else the copy is removed and the error is one line."""
    if not file.is_file():
        raise UserError(f"weights file {file} not found")
    if file.suffix not in (".safetensors", ".bin", ".pth"):
        raise UserError(f"{file}: expected a .safetensors (or pytorch_model.bin) file from {m.page}")
    if m.timm_name is None and config is None and local_config(m) is None:
        raise UserError(f"{m.name} needs its {CONFIG_FILE} too (it names the architecture): "
                        f"download it from {m.page}/tree/main and pass --config {CONFIG_FILE}")
    if config is not None:
        try:
            json.loads(Path(config).read_text())["architecture"]
        except Exception:
            raise UserError(f"{config} is not a timm config.json (no \"architecture\")") from None
    dest_dir = m.import_dir
    backup = dest_dir.with_name(dest_dir.name + ".previous")
    if dest_dir.exists():
        shutil.rmtree(backup, ignore_errors=True)
        dest_dir.rename(backup)
    dest_dir.mkdir(parents=True)
    dest = dest_dir / ("model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin")
    try:
        shutil.copyfile(file, dest)
        (dest_dir / (dest.name + ".sha256")).write_text(file_sha256(dest))
        cfg = config or (backup / CONFIG_FILE if (backup / CONFIG_FILE).is_file() else local_config(m))
        if cfg is not None:
            shutil.copyfile(cfg, dest_dir / CONFIG_FILE)
        check()
    except BaseException as e:
        shutil.rmtree(dest_dir, ignore_errors=True)
        if backup.exists():
            backup.rename(dest_dir)
        if isinstance(e, Exception) and not isinstance(e, UserError):
            msg = str(e).replace("\n", " ")[:240]
            raise UserError(f"{file} does not load strictly into {m.name}: {msg}") from None
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return dest
