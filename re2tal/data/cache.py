"""Node-local, size-bounded cache of remote videos, shared by the worker processes of a node.

decord decodes from a local file (handed a file-like object it would read it whole into memory),
so each remote video is streamed once into `storage.cache_dir` and decoded from there.

Layout of the cache directory:

    data/<key><ext>          complete videos; only ever created by an atomic rename
    tmp/<key>.<pid>.<tid>.part   downloads in progress
    locks/<key>.lock         one lock file per video (kept; they are empty)
    evict.lock               serialises eviction

`key` is a hash of the URL: objects are taken to be immutable (a changed video needs a new URL or
an emptied cache).

Locking (flock, released by the kernel when a process dies, even by SIGKILL):
- A reader holds its video's lock *shared* while it uses the file (a `Lease`): pinned, so no
  evictor deletes it between lookup and decord opening it.
- A downloader holds the lock *exclusive*: one download per video at a time on the node; other
  readers of that video wait (polling, bounded by `storage.timeout_s`) and then find the file.
  It writes `tmp/...part`, checks the length, fsyncs and renames into `data/`. Readers only ever
  look in `data/`, so a partial file is never read; a part left by a killed process is deleted by
  the next downloader of that video or by eviction (its lock is free, so nobody is writing it).
- Eviction runs before each download, under `evict.lock`: least recently used first (a hit
  touches the file's mtime), skipping videos whose lock cannot be taken exclusively at once
  (pinned or being written), until the incoming object fits under `storage.cache_max_gb`
  (in-progress parts count). If everything left is pinned the cache overshoots and says so.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from re2tal.config import StorageConfig
from re2tal.data import storage as st

log = logging.getLogger(__name__)

_POLL_S = 0.02


@dataclass
class CacheStats:
    """Counters of one process's use of the cache (thread-safe)."""

    hits: int = 0
    misses: int = 0
    bytes_fetched: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, hits: int = 0, misses: int = 0, bytes_fetched: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.bytes_fetched += bytes_fetched

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes_fetched": self.bytes_fetched}


class Lease:
    """A local path that stays valid (is not evicted) until `release()`; a context manager.

    May be released from another thread than the one that acquired it."""

    def __init__(self, path: str, fd: int | None = None):
        self.path = path
        self._fd = fd
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # drops the shared flock
                self._fd = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


class VideoCache:
    """See the module docstring."""

    def __init__(self, storage: StorageConfig):
        self.storage = storage
        self.root = Path(os.path.expanduser(os.path.expandvars(storage.cache_dir)))
        self.limit = int(storage.cache_max_gb * 1e9)
        self.stats = CacheStats()
        for sub in ("data", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def key(self, url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:40]

    def path(self, url: str) -> Path:
        """Where the complete file of `url` lives when cached."""
        ext = os.path.splitext(urlsplit(url).path)[1][:16]
        return self.root / "data" / f"{self.key(url)}{ext}"

    def acquire(self, url: str) -> Lease:
        """A lease on the local copy of `url`, fetched first if it is not cached yet."""
        key, path = self.key(url), self.path(url)
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Waiting covers another process's whole download, which is itself bounded.
            deadline = time.monotonic() + 2 * self.storage.timeout_s + 10
            fetched = False
            while True:
                _flock(fd, fcntl.LOCK_SH, deadline, url)
                if path.exists():
                    os.utime(path)  # most recently used
                    self.stats.add(hits=0 if fetched else 1)
                    return Lease(str(path), fd)
                fcntl.flock(fd, fcntl.LOCK_UN)
                if fetched:  # another process evicted it at once: everything else is in use
                    raise OSError(f"{url}: evicted right after download; storage.cache_max_gb={self.storage.cache_max_gb:g} "
                                  "is too small for the videos in use on this node")
                _flock(fd, fcntl.LOCK_EX, deadline, url)
                if not path.exists():
                    self._download(url, key, path)
                    fetched = True
                    self.stats.add(misses=1)
                # Loop: take the shared lock and look again (nothing holds the file in between).
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise

    def _download(self, url: str, key: str, path: Path) -> None:
        """Fetch `url` into `path` atomically. The caller holds the video's lock exclusively."""
        tmp = self.root / "tmp"
        for stale in tmp.glob(f"{key}.*.part"):  # left by a killed process: nobody writes it now
            stale.unlink(missing_ok=True)
        size = st.object_size(url, self.storage)
        self._make_room(size or 0)
        part = tmp / f"{key}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            st.fetch(url, part, self.storage, size, on_transfer=lambda n: self.stats.add(bytes_fetched=n))
            with open(part, "rb") as f:
                os.fsync(f.fileno())  # the rename must not become visible before the data
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)

    def usage(self) -> int:
        """Bytes in the cache, downloads in progress included."""
        return sum(size for _, size, _ in self._entries("data")) + sum(size for _, size, _ in self._entries("tmp"))

    def _entries(self, sub: str) -> list[tuple[float, int, Path]]:
        out = []
        with os.scandir(self.root / sub) as it:
            for entry in it:
                try:
                    stat = entry.stat()
                except FileNotFoundError:  # removed by another process meanwhile
                    continue
                out.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return out

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used, unpinned videos until `incoming` more bytes fit."""
        with open(self.root / "evict.lock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            used = 0
            for _, size, part in self._entries("tmp"):
                if self._remove_if_free(part.name.split(".")[0], part):  # stale part
                    continue
                used += size
            entries = sorted(self._entries("data"))
            used += sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if used + incoming <= self.limit:
                    return
                if self._remove_if_free(path.name.split(".")[0], path):
                    used -= size
            if used + incoming > self.limit:
                log.warning("video cache %s: %.2f GB pinned or in flight exceeds storage.cache_max_gb=%g",
                            self.root, (used + incoming) / 1e9, self.storage.cache_max_gb)

    def _remove_if_free(self, key: str, path: Path) -> bool:
        """Delete `path` if nobody holds `key`'s lock (not pinned, not being written)."""
        fd = os.open(self.root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)


def _flock(fd: int, op: int, deadline: float, url: str) -> None:
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}: waited too long for another process fetching it into the video cache")
        time.sleep(_POLL_S)
