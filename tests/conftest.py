"""Shared test fixtures: a real S3 endpoint on loopback, small real mp4 files, network faults.

- `s3_endpoint` (session): a moto S3 server (`ThreadedMotoServer`) on 127.0.0.1, a free port.
- `s3` (per test): a fresh bucket on it, as an `S3Bucket` whose `storage` is a StorageConfig
  carrying the endpoint and credentials (nothing put in the process environment) and a cache dir
  under the test's tmp_path; `overrides` gives the same as config keys for `with_overrides`.
- `make_video(path, frames, fps, ...)`: writes an h264 mp4 with PyAV whose frame k shows k in
  its pixel values; `frame_number(image)` reads it back (robust to resizing and compression).
- `Proxy`: a TCP proxy on loopback that can throttle, cut connections mid-response or stall.
- `tiny_config(base, tmp_path, annotations, name, **overrides)`: a test's tiny config tree made a
  validated Config, with its checkpoints and MLflow store under tmp_path.
"""

from __future__ import annotations

import fractions
import itertools
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from re2tal.config import Config, StorageConfig, validate

# Every Ray in these tests runs with token authentication, as users' clusters should: Ray 2.60
# turns it on for a local ray.init() anyway, but a cluster started otherwise (ray start, the
# multi-node tests' raylets) and the processes that connect to it must all be told.
os.environ.setdefault("RAY_AUTH_MODE", "token")

# --------------------------------------------------------------------------------------------
# configs


def tiny_config(base: dict[str, dict], tmp_path: Path, annotations: str, name: str, **overrides: Any) -> Config:
    """`base` (a config tree of a test module's tiny setup) reading `annotations`, run `name`,
    checkpoints in tmp_path/runs and MLflow in tmp_path/mlflow.db, then the dotted overrides."""
    tree = {section: dict(values) for section, values in base.items()}
    tree["data"]["annotations"] = annotations
    tree["train"] = tree.get("train", {}) | {"name": name, "storage_path": str(tmp_path / "runs")}
    tree["tracking"] = tree.get("tracking", {}) | {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return validate(tree).with_overrides(overrides)


# --------------------------------------------------------------------------------------------
# S3 on loopback

ACCESS_KEY, SECRET_KEY, REGION = "testing", "testing", "us-east-1"
_buckets = itertools.count()


@dataclass
class S3Bucket:
    endpoint_url: str
    bucket: str
    storage: StorageConfig
    fs: Any  # s3fs.S3FileSystem

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, local: str | os.PathLike, key: str) -> str:
        self.fs.put_file(os.fspath(local), f"{self.bucket}/{key}")
        return self.url(key)

    def put_bytes(self, data: bytes, key: str) -> str:
        self.fs.pipe_file(f"{self.bucket}/{key}", data)
        return self.url(key)

    def overrides(self, endpoint_url: str | None = None) -> dict[str, Any]:
        """Config keys (for Config.with_overrides / --set) that reach this bucket."""
        return {"storage.endpoint_url": endpoint_url or self.endpoint_url, "storage.region": REGION,
                "storage.access_key_id": ACCESS_KEY, "storage.secret_access_key": SECRET_KEY,
                "storage.cache_dir": self.storage.cache_dir}

    def storage_via(self, endpoint_url: str, **changes: Any) -> StorageConfig:
        """The same credentials through another endpoint (e.g. a `Proxy` in front of moto)."""
        return self.storage.model_copy(update={"endpoint_url": endpoint_url, **changes})


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, tmp_path) -> S3Bucket:
    import s3fs

    storage = StorageConfig(endpoint_url=s3_endpoint, region=REGION, access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY, cache_dir=str(tmp_path / "video-cache"), retries=2, timeout_s=30)
    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": s3_endpoint},
                           skip_instance_cache=True)
    bucket = f"test-{os.getpid()}-{next(_buckets)}"
    fs.mkdir(bucket)
    return S3Bucket(s3_endpoint, bucket, storage, fs)


# --------------------------------------------------------------------------------------------
# videos that say which frame they are

_LEVELS, _STEP = 32, 8  # two bands of 32 grey levels 8 apart: frame numbers up to 1023


def frame_image(k: int, height: int, width: int) -> np.ndarray:
    """Frame k: top third grey level k % 32, middle third k // 32, bottom third a fixed ramp."""
    img = np.empty((height, width, 3), np.uint8)
    third = height // 3
    img[:third] = (k % _LEVELS) * _STEP + _STEP // 2
    img[third: 2 * third] = (k // _LEVELS % _LEVELS) * _STEP + _STEP // 2
    img[2 * third:] = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    return img


def frame_number(img: np.ndarray) -> int:
    """Read k back from a (possibly resized, lossy) frame made by `frame_image`."""
    h = img.shape[0]
    lo = img[h // 12: h // 3 - h // 12].mean()
    hi = img[h // 3 + h // 12: 2 * h // 3 - h // 12].mean()
    return int(round((lo - _STEP // 2) / _STEP)) + _LEVELS * int(round((hi - _STEP // 2) / _STEP))


def write_video(path: str | os.PathLike, frames: int, fps: float | fractions.Fraction = 10, width: int = 64, height: int = 48,
                faststart: bool = False) -> Path:
    """An h264 mp4 of `frames` frames from `frame_image` (yuv420p, near-lossless)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fps if isinstance(fps, fractions.Fraction) else fractions.Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "8"}
        for k in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(k, height, width), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture
def make_video():
    return write_video


@pytest.fixture
def read_frame_number():
    return frame_number


# --------------------------------------------------------------------------------------------
# network faults


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of `target` ("http://host:port"), for real network faults.

    throttle: bytes per second from server to client (None: full speed).
    cut: the first `cut` connections that carry more than `cut_after` bytes back are reset (RST)
         at that point, mid-response.
    stall: accept connections and never answer.
    """

    def __init__(self, target: str, throttle: float | None = None, cut: int = 0, cut_after: int = 2048, stall: bool = False):
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.throttle, self.cut_left, self.cut_after, self.stall = throttle, cut, cut_after, stall
        self.cuts = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._socks.append(client)
            if self.stall:
                continue  # hold it open, say nothing
            upstream = socket.create_connection(self.target)
            self._socks.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(1024 if downstream and self.throttle else 65536):
                if downstream and self.cut_left > 0 and sent + len(data) > self.cut_after:
                    with self._lock:
                        cut = self.cut_left > 0
                        self.cut_left -= cut
                        self.cuts += cut
                    if cut:
                        dst.sendall(data[: max(0, self.cut_after - sent)])
                        # RST on close; shutting down first wakes the thread reading the other way
                        # (a plain close would wait for it, and the reset would never go out)
                        dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        dst.shutdown(socket.SHUT_RD)
                        dst.close()
                        src.close()
                        return
                dst.sendall(data)
                sent += len(data)
                if downstream and self.throttle:
                    time.sleep(len(data) / self.throttle)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
