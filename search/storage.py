"""--storage-path as a local (or shared NFS) folder or an object-store URI (s3://, gs://, file://).

Ray Tune writes trials and checkpoints there through pyarrow filesystems; whatever reads a checkpoint back
afterwards (the ROC plot of the best trial, `refit_best --from-checkpoint`) goes through Ray's Checkpoint
API too, which copies a remote checkpoint into a temporary folder. Paths recorded for later readers
(best_config.json) keep the URI, query string included (e.g. s3://bucket/x?endpoint_override=...).
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from datasets.errors import UserError


def is_uri(path: str | None) -> bool:
    return bool(path) and "://" in str(path)


def check_storage_path(storage_path: str) -> None:
    """A URI pyarrow cannot open (unknown scheme, missing filesystem support) fails before Ray starts."""
    if not is_uri(storage_path):
        return
    import pyarrow.fs

    try:
        pyarrow.fs.FileSystem.from_uri(storage_path)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid, ArrowNotImplementedError, OSError
        raise UserError(f"--storage-path {storage_path}: pyarrow cannot open it ({str(e).splitlines()[0][:200]}); "
                        f"check the URI and this machine's credentials and network (s3://bucket/path, "
                        f"gs://bucket/path), or use a folder every node mounts") from None


def join(storage_path: str, name: str) -> str:
    """``<storage_path>/<name>``; for a URI inside its path, before any query string (s3://b/x?region=... ->
    s3://b/x/name?region=...)."""
    if not is_uri(storage_path):
        return f"{storage_path.rstrip('/')}/{name}"
    parts = urlsplit(storage_path)
    return urlunsplit((parts.scheme, parts.netloc, f"{parts.path.rstrip('/')}/{name}", parts.query, ""))


def uri_for(fs_path: str | None, storage_path: str) -> str | None:
    """The URI of ``fs_path`` (a path as Ray's pyarrow filesystem names it, e.g. 'bucket/x/name/trial/ckpt')
    under the storage URI it came from; local storage paths are returned as they are."""
    if fs_path is None or not is_uri(storage_path) or is_uri(fs_path):
        return fs_path
    import pyarrow.fs

    _, root = pyarrow.fs.FileSystem.from_uri(storage_path)
    root = root.rstrip("/")
    if not (fs_path == root or fs_path.startswith(root + "/")):
        return fs_path
    parts = urlsplit(storage_path)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + fs_path[len(root):], parts.query, ""))


@contextmanager
def local_checkpoint(path: str) -> Iterator[Path]:
    """A checkpoint folder readable with plain file APIs: the folder itself, or a temporary download of a URI.
    A checkpoint that cannot be read is a UserError naming it."""
    if not is_uri(path):
        yield Path(path)
        return
    from ray import tune

    with ExitStack() as stack:
        try:
            folder = stack.enter_context(tune.Checkpoint(path).as_directory())
        except Exception as e:  # noqa: BLE001 - no such bucket/key, no credentials, unknown scheme
            raise UserError(f"cannot read the checkpoint {path} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); check the object store's credentials on this "
                            f"machine") from None
        yield Path(folder)
