"""A search on a Ray cluster (`search.run --address ...`): what the address means, what a trial may ask of
the cluster's nodes, and a pre-flight task on every node that could run a trial.

On one machine the driver's view is the trials' view. On a cluster it is not: a trial lands on some node,
and if that node cannot see the data cache, the pretrained weights or the storage path, every trial it
gets fails, one by one, after the search has started. So the driver checks each node first (a tiny Ray
task pinned to it) and stops with one line naming the node and the fix.
"""
from __future__ import annotations

import json
import os
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

from datasets.errors import UserError

RAY_CLIENT = "ray://"
# A node's first Ray worker starts a Python process and imports the project, and may download weights.
PREFLIGHT_TIMEOUT_S = 300.0
MARKER = ".pcam-tune-preflight-"  # + a fresh token: a file the driver writes under --storage-path


# --- the address -----------------------------------------------------------------------------------------------

def cluster_address(address: str | None, argv: list[str] | None = None) -> str | None:
    """--address, else $RAY_ADDRESS (what `ray job submit` sets for the search's driver); None = start Ray
    on this machine. Ray Client addresses are refused with the Ray Jobs command to use instead."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(RAY_CLIENT):
        raise UserError(ray_client_refusal(address, argv))
    return address


def ray_client_refusal(address: str, argv: list[str] | None) -> str:
    # Under Ray Client the Tuner runs on the head while this process keeps the MLflow callback's store,
    # --results-dir and the cache path: they name this machine's files, which the head cannot reach.
    host = address[len(RAY_CLIENT):].split("/")[0].rsplit(":", 1)[0] or "HEAD"
    rest = _without_address(argv) or ["--space", "SPACE", "..."]
    return (f"--address {address} is Ray Client mode, where the search's driver-side MLflow tracking and local "
            f"paths break; submit the search as a Ray Job instead: ray job submit --address http://{host}:8265 "
            f"--working-dir . -- python -m search.run {shlex.join(rest)} (see docs/cluster.md)")


def _without_address(argv: list[str] | None) -> list[str]:
    out, skip = [], False
    for a in argv or []:
        if skip:
            skip = False
        elif a == "--address":
            skip = True
        elif not a.startswith("--address="):
            out.append(a)
    return out


def check_job_paths(**paths: str | Path | None) -> None:
    """Under `ray job submit --working-dir`, the driver runs in a temporary copy of the working directory that
    Ray deletes when the job ends: results, checkpoints or a sqlite store below it would be lost."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # set by Ray for a job's driver
    if "working_dir" not in (job.get("runtime_env") or {}):
        return
    cwd = Path.cwd().resolve()
    lost = ["--" + opt.replace("_", "-") for opt, p in paths.items()
            if p and "://" not in str(p) and Path(p).resolve().is_relative_to(cwd)]
    if lost:
        raise UserError(f"{', '.join(lost)} would be inside this Ray Job's temporary working directory {cwd}, which "
                        f"Ray deletes when the job ends; pass absolute paths on storage that outlives the job "
                        f"(e.g. --results-dir /shared/pcam-results) and an MLflow server as --tracking-uri")


# --- what the nodes have, what a trial may ask -----------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    cpus: float
    gpus: float

    def __str__(self) -> str:
        return f"node {self.node_id[:8]} ({self.ip})"


def alive_nodes() -> list[Node]:
    """The cluster's live nodes with their logical CPUs and GPUs (the driver must be connected)."""
    import ray

    return [Node(n["NodeID"], n.get("NodeManagerAddress", "?"), float(n["Resources"].get("CPU", 0)),
                 float(n["Resources"].get("GPU", 0))) for n in ray.nodes() if n.get("Alive")]


def trial_resources(args, nodes: list[Node], num_samples: int, where: str) -> tuple[float, float, int]:
    """(CPUs per trial, GPUs per trial, trials at once) from the cluster's nodes.

    A trial runs on one node, so a request is checked against the largest node, not the cluster's total
    (2 CPUs on a cluster of 1-CPU nodes would wait forever). Defaults: half a GPU per trial when the
    cluster has GPUs (96 px nets leave a GPU idle), with an equal share of that node's CPUs; else 1 CPU
    (2 on nodes above 4 CPUs). Concurrency is what the nodes fit, at most one trial per sample."""
    gpus = [n.gpus for n in nodes]
    gpt = args.gpus_per_trial if args.gpus_per_trial is not None else (0.5 if any(gpus) else 0.0)
    if gpt and not any(gpus):
        raise UserError(f"--gpus-per-trial {gpt:g} but {where} has no GPU; use --gpus-per-trial 0 (train on CPU) "
                        f"or add GPU nodes")
    if gpt > 1 and gpt != int(gpt):
        raise UserError(f"--gpus-per-trial {gpt:g}: above 1 it must be a whole number of GPUs")
    hosts = [n for n in nodes if n.gpus >= gpt and n.cpus > 0]
    if not hosts:
        raise UserError(f"--gpus-per-trial {gpt:g}: no node of {where} has {gpt:g} GPU(s) and a CPU "
                        f"(largest: {max(gpus):g} GPU); ask for at most {max(gpus):g}")
    if args.cpus_per_trial is not None:
        cpt = float(args.cpus_per_trial)
    elif gpt:
        cpt = float(min(max(1, int(n.cpus // int(n.gpus // gpt))) for n in hosts))
    else:
        cpt = 1.0 if min(n.cpus for n in hosts) <= 4 else 2.0
    fits = [n for n in hosts if n.cpus >= cpt]
    if not fits:
        largest = max(n.cpus for n in hosts)
        raise UserError(f"--cpus-per-trial {cpt:g}: no node of {where} has {cpt:g} CPUs"
                        f"{' beside its GPUs' if gpt else ''} (a trial runs on one node; the largest has "
                        f"{largest:g}); ask for at most {largest:g}")
    slots = sum(min(int(n.cpus // cpt), int(n.gpus // gpt) if gpt else 1 << 30) for n in fits)
    conc = args.max_concurrent if args.max_concurrent is not None else slots
    return cpt, float(gpt), max(1, min(conc, num_samples))


def trial_hosts(nodes: list[Node], cpus_per_trial: float, gpus_per_trial: float) -> list[Node]:
    """The nodes Ray may place a trial on: the ones the pre-flight must check."""
    return [n for n in nodes if n.cpus >= cpus_per_trial and n.gpus >= gpus_per_trial]


# --- pre-flight on every node ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Needs:
    """What every trial host must see, as the driver sees it."""

    cache_path: str
    fingerprint: str
    pretrained: tuple[str, ...]  # backbones whose ImageNet weights the trials load
    storage_path: str
    data_dir: str | None  # for the fix in the message


def check_this_node(needs: Needs, marker: str) -> list[str]:
    """Run on a node (a Ray task pinned to it): what is missing there, each with its fix, or []."""
    from datasets.cache import META, open_cache
    from trainables.weights import MIRROR_ENV, download_error, download_missing

    problems = []
    cache = Path(needs.cache_path)
    if not (cache / META).is_file():
        problems.append(f"cannot see the data cache {cache}: put the cache on storage every node mounts "
                        f"(--cache-dir /shared/pcam-cache), or build it on that node with `python -m datasets.prepare"
                        f"{' --data-dir ' + needs.data_dir if needs.data_dir else ''} --cache-dir {cache.parent}` "
                        f"(the same data at the same path, copied with its timestamps: rsync -a)")
    else:
        try:
            found = open_cache(cache).fingerprint
        except UserError as e:  # a half-copied folder: the message names it and the fix
            problems.append(f"has a broken data cache: {e}")
            found = needs.fingerprint
        if found != needs.fingerprint:
            problems.append(f"has a different data cache at {cache} (fingerprint {found[:12]}, the driver's is "
                            f"{needs.fingerprint[:12]}): put the cache on storage every node mounts "
                            f"(--cache-dir /shared/pcam-cache), or copy the driver's folder there (rsync -a)")
    # Like the driver: download what this node's torch hub cache lacks, once, before its trials all try at once.
    failed = download_missing(needs.pretrained, progress=False)
    if failed:
        files = ", ".join(f"{path} ({b})" for b, _, path, _ in failed)
        problems.append(f"lacks pretrained weights {files} and downloading them failed "
                        f"({download_error(failed[0][3])}): run `python -m trainables.weights import FILE "
                        f"--backbone {failed[0][0]}` on that node, set ${MIRROR_ENV} there to a mirror, or set "
                        f"TORCH_HOME to storage every node mounts")
    if not _marker_visible(needs.storage_path, marker):
        problems.append(f"cannot see --storage-path {needs.storage_path} (trial checkpoints go there): use storage "
                        f"every node mounts (NFS) or an object store URI (s3://bucket/path, gs://bucket/path)")
    return problems


def preflight(nodes: list[Node], needs: Needs, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """Check every trial host before any trial starts; one UserError line naming the first bad node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from search.outcome import error_line

    try:
        marker = _write_marker(needs.storage_path)
    except OSError as e:
        raise UserError(f"cannot write to --storage-path {needs.storage_path} from the driver "
                        f"({str(e).splitlines()[0][:200]}): check its permissions or the object store's "
                        f"credentials") from None
    try:
        # num_cpus=0: it must run even on a node busy with another search's trials.
        task = ray.remote(num_cpus=0, max_retries=0)(check_this_node)
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
                .remote(needs, marker): n for n in nodes}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        problems = []
        for ref, node in refs.items():
            if ref not in ready:
                problems.append((node, f"did not answer the pre-flight check in {timeout_s:g} s (is it overloaded "
                                       f"or cut off from the head?)"))
                continue
            try:
                problems += [(node, p) for p in ray.get(ref)]
            except Exception as e:  # noqa: BLE001 - any task failure there, e.g. the project not importable
                problems.append((node, f"cannot run pcam-tune ({error_line(e)}): install the project on every node, "
                                       f"or submit the search with `ray job submit --working-dir . -- python -m "
                                       f"search.run ...`"))
    finally:
        _remove_marker(needs.storage_path, marker)
    if problems:
        node, first = problems[0]
        others = sorted({str(n) for n, _ in problems[1:]} - {str(node)})
        raise UserError(f"pre-flight check failed: {node} {first}"
                        + (f" (also failing: {', '.join(others)})" if others else ""))


def _fs(storage_path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(storage_path)  # a plain path gives the local filesystem


def _marker_path(storage_path: str, token: str):
    fs, root = _fs(storage_path)
    return fs, f"{root.rstrip('/')}/{MARKER}{token}"


def _write_marker(storage_path: str) -> str:
    """A file with a fresh token under the storage path, written by the driver; each node must read it back.
    One file per search: another search may be checking its nodes against the same storage right now."""
    token = uuid.uuid4().hex
    fs, path = _marker_path(storage_path, token)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(token.encode())
    return token


def _marker_visible(storage_path: str, token: str) -> bool:
    try:
        fs, path = _marker_path(storage_path, token)
        with fs.open_input_stream(path) as f:
            return f.read().decode() == token
    except (OSError, ValueError):  # not found, no such bucket, no credentials on that node
        return False


def _remove_marker(storage_path: str, token: str) -> None:
    fs, path = _marker_path(storage_path, token)
    fs.delete_file(path)
