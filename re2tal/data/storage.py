"""fsspec filesystems for any URL, configured from the storage section, and whole-object reads
that survive flaky storage.

Credentials and endpoints come from the config when given there, else from the standard
AWS / GCP environment (s3fs / gcsfs read it themselves).

Transient errors (throttling, connection resets, truncated transfers, timeouts) are retried at two
levels: botocore retries each request (`storage.retries`, standard mode backoff; s3fs adds a few
retries of its own and resumes interrupted downloads), and `fetch` / `read_bytes` retry the whole
object with exponential backoff and jitter. Everything one object
takes, retries included, is bounded by `storage.timeout_s`, so nothing hangs. Missing objects and
refused permissions are not retried.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import aiohttp
import fsspec
from botocore.exceptions import BotoCoreError
from fsspec.asyn import AsyncFileSystem

from re2tal.config import StorageConfig
from re2tal.errors import BadInput

log = logging.getLogger(__name__)

# Errors that retrying cannot fix.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

T = TypeVar("T")


class TruncatedTransfer(OSError):
    """Fewer (or more) bytes arrived than the object has."""


def protocol(url: str) -> str:
    scheme = urlsplit(str(url)).scheme
    return "file" if len(scheme) <= 1 else scheme


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def storage_options(url: str, storage: StorageConfig) -> dict[str, Any]:
    """Keyword arguments for fsspec for this URL's protocol."""
    proto = protocol(url)
    if proto in ("s3", "s3a"):
        opts: dict[str, Any] = {
            "anon": storage.anon,
            # botocore retries throttling and connection errors with backoff (s3fs adds its own
            # few); the socket timeouts keep a dead connection from blocking a read.
            "config_kwargs": {
                "connect_timeout": min(10.0, storage.timeout_s),
                "read_timeout": storage.timeout_s,
                "retries": {"max_attempts": storage.retries, "mode": "standard"},
            },
        }
        client: dict[str, Any] = {}
        if storage.endpoint_url:
            client["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client["region_name"] = storage.region
        if client:
            opts["client_kwargs"] = client
        if storage.access_key_id is not None:
            opts["key"] = storage.access_key_id.get_secret_value()
            opts["secret"] = storage.secret_access_key.get_secret_value()
        return opts
    if proto in ("gs", "gcs"):
        return {"token": "anon"} if storage.anon else {}
    return {}


def filesystem(url: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL."""
    try:
        return fsspec.core.url_to_fs(str(url), **storage_options(url, storage))
    except ImportError as err:
        raise BadInput(f"{url}: the {protocol(url)}:// protocol needs a package that is not installed ({err})") from None
    except ValueError as err:
        raise BadInput(f"{url}: cannot open this URL ({err})") from None


def transient(err: BaseException) -> bool:
    """Whether retrying may help (network, throttling, timeouts) rather than fail the same way."""
    if isinstance(err, PERMANENT):
        return False
    return isinstance(err, (OSError, TimeoutError, BotoCoreError, aiohttp.ClientError))


def _call(fs: fsspec.AbstractFileSystem, method: str, *args: Any, timeout: float) -> Any:
    """Call a filesystem method; async filesystems (s3, gs, http) cancel it after `timeout`."""
    if isinstance(fs, AsyncFileSystem):
        return getattr(fs, method)(*args, timeout=max(timeout, 1e-3))
    return getattr(fs, method)(*args)


def _retrying(url: str, storage: StorageConfig, attempt: Callable[[float], T]) -> T:
    """Run `attempt(seconds_left)` until it succeeds, fails for good, or retries or time run out."""
    deadline = time.monotonic() + storage.timeout_s
    for i in itertools.count():
        try:
            return attempt(deadline - time.monotonic())
        except Exception as err:
            if not transient(err):
                raise
            pause = min(10.0, 0.2 * 2**i) * random.uniform(0.5, 1.0)
            if time.monotonic() + pause >= deadline:
                raise TimeoutError(f"{url}: not read within storage.timeout_s={storage.timeout_s:g} s "
                                   f"({err.__class__.__name__}: {err})") from err
            if i == storage.retries:
                raise
            log.warning("%s: %s: %s; retry %d/%d in %.1f s", url, err.__class__.__name__, err, i + 1, storage.retries, pause)
            time.sleep(pause)


def object_size(url: str, storage: StorageConfig) -> int | None:
    """Size in bytes of the object at `url` (None if the server does not say)."""
    fs, path = filesystem(url, storage)
    info = _retrying(url, storage, lambda left: _call(fs, "info", path, timeout=left))
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{url} is a folder, not a file")
    size = info.get("size")
    return None if size is None else int(size)


def fetch(url: str, dest: str | os.PathLike, storage: StorageConfig, size: int | None = None,
          on_transfer: Callable[[int], None] | None = None) -> int:
    """Copy the object at `url` to the local file `dest` (overwritten) and return its size.

    A transfer whose length differs from `size` (or the object's size, asked for if not given)
    counts as transient and is retried. `on_transfer(n)` is called with the bytes that arrived in
    each attempt, failed ones included (what the storage served).
    """
    fs, path = filesystem(url, storage)
    expected = object_size(url, storage) if size is None else size

    def attempt(left: float) -> int:
        try:
            _call(fs, "get_file", path, os.fspath(dest), timeout=left)
        finally:
            got = os.path.getsize(dest) if os.path.exists(dest) else 0
            if on_transfer is not None:
                on_transfer(got)
        if expected is not None and got != expected:
            raise TruncatedTransfer(f"{url}: got {got} of {expected} bytes")
        return got

    return _retrying(url, storage, attempt)


def read_bytes(url: str, storage: StorageConfig) -> bytes:
    """The whole object at `url` in memory (annotation files and other small objects)."""
    fs, path = filesystem(url, storage)
    return _retrying(url, storage, lambda left: _call(fs, "cat_file", path, timeout=left))
