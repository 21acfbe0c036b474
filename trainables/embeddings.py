"""The embedding cache: a frozen backbone's features of every patch, computed once, memory-mapped by every trial.

A trial that trains only a head (``unfreeze_depth`` 0, trainables.probe) needs the backbone's output for each
patch, not the backbone. Those features are computed once per (data, backbone, weights, input size, precision)
(the config's ``input_size``: the patches are resized to it before the network, so it changes the features) and stored
beside the decode-once data cache:

    <cache root>/embeddings/<data cache folder>/<backbone>-<weights sha256[:16]>-<input size>px-<precision>/
        features.f16   float16 (N, 8, D): row i = patch i of the data cache, one row per dihedral view
        meta.json      n, views, dim, backbone, weights id, data fingerprint, precision, seconds

The 8 views are the dihedral group (trainables.augment.dihedral_view: flips and 90 degree rotations, what
histology's lack of orientation allows): a head trains on all 8 rows of each patch (its augmentation), validates
on view 0 and predicts with the mean over the 8 (TTA), as the fine-tuned models do. Features are what the
network hands its classifier (the pooled embedding), in the config's inference precision, stored in float16.

The search's driver computes them before any trial starts (search.run, like the data cache); a trial that still
finds them missing computes them under a file lock, so two trials never compute the same features. The folder
is built under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.errors import UserError
from datasets.files import clean_stale_temps, temp_path
from trainables.augment import dihedral_view
from trainables.config import ResolvedConfig, fast_path, pick_device, resolve_config
from trainables.engine import to_input
from trainables.models import build_model, is_pretrainable

FEATURES, META = "features.f16", "meta.json"
VIEWS = 8
RANDOM_INIT_SEED = 0  # a backbone without pretrained weights is drawn with this seed: the same in every process
_computed = 0  # how many feature sets this process computed (the tests assert a second trial adds none)


def computed_count() -> int:
    return _computed


@dataclass
class Embeddings:
    path: Path
    features: np.ndarray  # float16 (N, VIEWS, D), read-only memmap
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])


def uses_cached_features(cfg: dict) -> bool:
    """Trials that train only a head on a backbone with transferable features take them from this cache."""
    spec = cfg.backbone_spec if isinstance(cfg, ResolvedConfig) else cfg["backbone"]
    return cfg.get("unfreeze_depth") == 0 and is_pretrainable(spec)


def frozen_backbone(cfg: dict):
    """The frozen network the features come from (seeded when it has no pretrained weights)."""
    cfg = resolve_config(cfg)  # as it is when resolved already
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return build_model(cfg.backbone_spec, bool(cfg["pretrained"]), 0, 0.0)


def weights_id(cfg: dict) -> str:
    """What identifies the backbone's weights: the file's sha256 (hub) or hash-suffixed name + file identity
    (torchvision); random weights: what draws them (random_weights_id)."""
    cfg = resolve_config(cfg)
    if not cfg["pretrained"]:
        return random_weights_id(cfg)
    from trainables import hub, weights
    w = weights.resolve_weights(cfg["backbone"], cfg.backbone_spec)
    if hub.is_hub_name(cfg["backbone"]):
        return hub.weights_id(Path(w))[:16]
    # The hash-suffixed name alone does not say which file: `trainables.weights import` puts any file that loads
    # strictly under that name. The file's identity (inode, size, mtime: a new import is a new file) says so cheaply.
    file = weights.cached_path(w)
    st = file.stat()
    import hashlib
    return f"{file.stem}-{hashlib.sha256(f'{st.st_ino}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:8]}"


def random_weights_id(cfg: dict) -> str:
    """The random weights' id without building the network: what determines them. frozen_backbone draws them on
    the CPU from RANDOM_INIT_SEED, so they are a function of the backbone (an hf-hub one's config.json: its
    architecture), that seed and the libraries drawing them (torch, torchvision, timm: an upgrade may draw other
    weights, so it gets a new id and new features, never another's). Hashing the drawn state instead cost a build
    and a pass over every weight on each call (each trial's features_dir)."""
    import hashlib

    import timm
    import torchvision

    from trainables import hub
    cfg = resolve_config(cfg)
    parts = [cfg["backbone"], f"seed {RANDOM_INIT_SEED}", f"torch {torch.__version__}",
             f"torchvision {torchvision.__version__}", f"timm {timm.__version__}"]
    if hub.is_hub_name(cfg["backbone"]):
        m = hub.hub_model(cfg["backbone"])
        config = hub.local_config(m) if m.timm_name is None else None
        if config is not None:
            parts.append(hashlib.sha256(config.read_bytes()).hexdigest())
    return f"random-{hashlib.sha256(chr(10).join(parts).encode()).hexdigest()[:12]}"


def features_dir(cache, cfg: dict) -> Path:
    cfg = resolve_config(cfg)
    precision = fast_path(cfg, pick_device(), training=False).name.replace(" ", "_")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg["backbone"])
    size = int(cfg["input_size"] or cache.images.shape[1])  # to_input resizes the patches to it: other features
    return (Path(cache.path).parent / "embeddings" / Path(cache.path).name
            / f"{slug}-{weights_id(cfg)}-{size}px{_resize_tag(cfg)}-{precision}")


def _resize_tag(cfg: ResolvedConfig) -> str:
    """A timm network that resizes the patches itself, with its pretrained config's interpolation, names it when it
    is not bilinear (what every such network used before): other features, another folder."""
    from trainables import hub, timm_backbones
    if not hub.is_hub_name(cfg["backbone"]):
        return ""
    mode = timm_backbones.resize(cfg["backbone"])
    return f"-{mode}" if mode not in (None, "bilinear") else ""


def open_embeddings(folder: Path) -> Embeddings | None:
    """The complete feature set in ``folder``, memory-mapped; None when it is not there (or not complete)."""
    try:
        meta = json.loads((folder / META).read_text())
        shape = (int(meta["n"]), int(meta["views"]), int(meta["dim"]))
        if (folder / FEATURES).stat().st_size != int(np.prod(shape)) * 2:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return Embeddings(folder, np.memmap(folder / FEATURES, dtype=np.float16, mode="r", shape=shape), meta)


def _embed_batch(model, x: torch.Tensor, path) -> torch.Tensor:
    """(B, VIEWS, D) features: the input of the network's classifier for each dihedral view of ``x``."""
    got = []
    hook = model.head().register_forward_pre_hook(lambda mod, args: got.append(torch.flatten(args[0], 1).float()))
    try:
        out = []
        for k in range(VIEWS):
            with path.autocast():
                model(dihedral_view(x, k))
            out.append(got.pop())
    finally:
        hook.remove()
    return torch.stack(out, 1)


def compute(cache, cfg: dict, folder: Path, progress: bool = True, batch_size: int | None = None) -> Embeddings:
    """Run the frozen backbone over every row of the data cache in the 8 views; write the folder atomically."""
    global _computed
    cfg = resolve_config(cfg)
    device = pick_device()
    path = fast_path(cfg, device, training=False)
    model = path.prepare_model(frozen_backbone(cfg).to(device).eval())
    n = len(cache.images)
    bs = int(batch_size or path.inference_batch())
    clean_stale_temps(folder.parent, folder.name)  # a killed computation's (we hold the lock)
    tmp = temp_path(folder)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    feats = None
    steps = range(0, n, bs)
    tty = progress and sys.stderr.isatty()
    if tty:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"embeddings {cfg['backbone']}", unit="batch", file=sys.stderr)
    if progress:
        print(f"computing {cfg['backbone']} features of {n:,} patches x {VIEWS} views ({path.name}) -> {folder}",
              flush=True)
    with torch.inference_mode():
        for s in steps:
            x = torch.from_numpy(np.array(cache.images[s:s + bs])).to(device)
            x = path.prepare_input(to_input(x, cfg, aug=False, dtype=path.input_dtype, channels_last=path.channels_last))
            f = _embed_batch(model, x, path).cpu().numpy().astype(np.float16)
            if not np.isfinite(f).all():
                shutil.rmtree(tmp, ignore_errors=True)
                raise UserError(f"{cfg['backbone']} features overflow float16 (|x| > 65504) at rows {s}..{s + len(f)}: "
                                "this backbone cannot use the embedding cache; train it with unfreeze_depth >= 1")
            if feats is None:
                feats = np.memmap(tmp / FEATURES, dtype=np.float16, mode="w+", shape=(n, VIEWS, f.shape[-1]))
            feats[s:s + len(f)] = f
            done = s + len(f)
            if progress and not tty and (done * 10 // n) > (s * 10 // n):  # a plain line per tenth off a terminal
                print(f"  {done:,}/{n:,} patches, {time.perf_counter() - t0:.0f}s", flush=True)
    dim = int(feats.shape[-1]) if feats is not None else 0
    if feats is not None:
        feats.flush()
        del feats
    meta = {"n": n, "views": VIEWS, "dim": dim, "dtype": "float16", "backbone": cfg["backbone"],
            "pretrained": bool(cfg["pretrained"]), "weights": weights_id(cfg), "precision": path.name,
            "input_size": int(cfg["input_size"] or cache.images.shape[1]),
            "data_fingerprint": cache.fingerprint, "seconds": round(time.perf_counter() - t0, 1)}
    (tmp / META).write_text(json.dumps(meta, indent=1))
    if open_embeddings(folder) is not None:  # written meanwhile by a process that did not take the lock: keep it
        shutil.rmtree(tmp)
    else:  # absent, or there but not a complete feature set (it would be kept forever and never open): replaced
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    _computed += 1
    if progress:
        print(f"{cfg['backbone']} features: {n:,} x {VIEWS} x {dim} in {meta['seconds']:.0f}s", flush=True)
    return open_embeddings(folder)


def ensure_embeddings(cache, cfg: dict, progress: bool = False) -> Embeddings:
    """The feature set of ``cfg``'s backbone for ``cache``: opened when there, else computed under a file lock
    (a process that waited for the lock finds it complete and opens it)."""
    from filelock import FileLock

    folder = features_dir(cache, cfg)
    found = open_embeddings(folder)
    if found is not None:
        return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        found = open_embeddings(folder)
        if found is not None:
            return found
        return compute(cache, cfg, folder, progress)
