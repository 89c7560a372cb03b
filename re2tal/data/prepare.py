"""Videos transcoded once to the training resolution and frame rate (no Ray here; the cluster job
that runs `prepare_video` on every video is `re2tal.raydata.prepare`).

Decoding a 720p, 30 fps source costs several times what decoding the same video at a 256 short
side and 15 fps does, and training decodes every video every epoch; so, as OpenTAD does with
ffmpeg by hand ("all end-to-end ActivityNet experiments are based on" videos at 15 fps, short
side 256), each video is transcoded once. Here PyAV (libx264) does it, no ffmpeg binary.

Output video: h264 yuv420p mp4, short side `short_side` (the long side scaled to keep the aspect
ratio, rounded to an even number as yuv420p needs), `fps` frames per second, a keyframe every
`gop` frames (no scene-cut keyframes, no B-frames: a sampled seek decodes at most `gop` frames),
no audio. Output frame j covers [j / fps, (j + 1) / fps) and shows the source frame on screen at
its centre (j + 0.5) / fps, the loader's own sampling rule; there are round(duration * fps)
of them, so the duration stays within half an output frame of the source's.

Layout under the output folder `out`:

    videos/<id>.mp4      the prepared video; only ever created by a move from a temporary name
    videos/<id>.json     its record (source, settings, source and output info, bytes), written
                         after the video: a video counts as prepared only when both exist and
                         the record's settings are the ones asked for
    annotations.json     the source annotations with each prepared video's `url` pointing at
                         videos/<id>.mp4 (relative); durations and segments unchanged
    prepare.json         the job's summary: counts, bytes, seconds, and the videos that failed

A killed job leaves at most `*.partial-*` objects and videos without a record, which the next
run redoes.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction

import av

from re2tal.config import StorageConfig
from re2tal.data import storage as st
from re2tal.data.video import VideoError, VideoFile, _reason, output_size

PRESET = "veryfast"  # x264 preset: about 3x faster to encode than x264's default "medium"


@dataclass(frozen=True)
class Settings:
    short_side: int = 256
    fps: float = 15.0
    gop: int = 15  # frames between keyframes
    crf: int = 23  # x264 constant rate factor: 23 is x264's default (what a plain ffmpeg call gives); lower is better

    def check(self) -> "Settings":
        from re2tal.errors import BadInput

        if self.short_side < 2 or self.short_side % 2:
            raise BadInput(f"--short-side: must be an even number >= 2 (h264 yuv420p), got {self.short_side}")
        if not (0 < self.fps <= 240):
            raise BadInput(f"--fps: must be in (0, 240], got {self.fps:g}")
        if self.gop < 1:
            raise BadInput(f"--gop: must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise BadInput(f"--crf: must be in 0..51, got {self.crf}")
        return self


def video_path(root: str, video_id: str) -> str:
    return posixpath.join(root, "videos", f"{video_id}.mp4")


def record_path(root: str, video_id: str) -> str:
    return posixpath.join(root, "videos", f"{video_id}.json")


def even_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side `short_side`, aspect kept, both even."""
    h, w = output_size(height, width, short_side)
    return max(2, 2 * round(h / 2)), max(2, 2 * round(w / 2))


def transcode(src: str, dst: str, settings: Settings, threads: int = 1) -> None:
    """Write `src` (a local file) re-encoded to `settings` into the local file `dst`."""
    rate = Fraction(settings.fps).limit_denominator(1001)
    with av.open(src) as inp:
        if not inp.streams.video:
            raise VideoError("no video stream")
        stream = inp.streams.video[0]
        stream.thread_count = threads
        height, width = even_size(stream.codec_context.height, stream.codec_context.width, settings.short_side)
        with av.open(dst, "w", format="mp4") as out:
            enc = out.add_stream("libx264", rate=rate, options={
                "crf": str(settings.crf), "preset": PRESET, "g": str(settings.gop), "keyint_min": str(settings.gop),
                "sc_threshold": "0", "bf": "0"})
            enc.codec_context.width, enc.codec_context.height = width, height
            enc.codec_context.pix_fmt = "yuv420p"
            enc.codec_context.thread_count = threads
            j, first, current, end = 0, None, None, 0.0
            for frame in inp.decode(stream):
                if frame.pts is None:
                    continue
                start = float(frame.pts * frame.time_base)
                first = start if first is None else first
                start -= first
                # every output frame whose centre falls before this frame's start shows the previous one
                while current is not None and (j + 0.5) / rate < start:
                    j = _emit(out, enc, current, j, rate)
                current = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                step = float(frame.duration * frame.time_base) if frame.duration else 1.0 / float(stream.average_rate or rate)
                end = start + step
            if current is None:
                raise VideoError("no decodable frame")
            total = max(1, round(end * rate))  # the last frame lasts until the source's end
            while j < total:
                j = _emit(out, enc, current, j, rate)
            out.mux(enc.encode(None))


def _emit(out, enc, frame: av.VideoFrame, j: int, rate: Fraction) -> int:
    frame.pts, frame.time_base = j, 1 / rate
    out.mux(enc.encode(frame))
    return j + 1


def check_output(source: VideoFile, path: str, settings: Settings) -> VideoFile:
    """The prepared file, opened as the loader will; VideoError unless its size is the asked one,
    its frame rate `fps`, its frame count round(duration * fps) and its duration within one
    output frame of the source's."""
    out = VideoFile(path)
    want = even_size(source.height, source.width, settings.short_side)
    problems = []
    if (out.info.height, out.info.width) != want:
        problems.append(f"size {out.info.width}x{out.info.height}, expected {want[1]}x{want[0]}")
    if not math.isclose(out.info.fps, settings.fps, rel_tol=1e-3):
        problems.append(f"{out.info.fps:g} fps, expected {settings.fps:g}")
    if abs(out.info.frames - out.info.duration * settings.fps) > 0.5 + 1e-6:
        problems.append(f"{out.info.frames} frames do not fill {out.info.duration:.3f} s at {settings.fps:g} fps")
    if abs(out.info.duration - source.info.duration) > 1.0 / settings.fps + 1e-6:
        problems.append(f"duration {out.info.duration:.3f} s, the source's {source.info.duration:.3f} s")
    if problems:
        raise VideoError("prepared copy is wrong: " + "; ".join(problems))
    return out


def is_prepared(fs, root: str, video_id: str, source_url: str, settings: Settings) -> dict | None:
    """The record of a video already prepared from `source_url` with `settings`, else None."""
    try:
        record = json.loads(fs.cat_file(record_path(root, video_id)))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("settings") != asdict(settings) or record.get("source") != source_url:
        return None
    if not fs.exists(video_path(root, video_id)):
        return None
    return record


def prepare_video(video_id: str, source_url: str, out_url: str, settings: Settings, storage: StorageConfig) -> dict:
    """Prepare one video unless already done. Returns its record plus `status` ("prepared",
    "skipped" or "failed"; a failure carries `reason` instead of the info)."""
    fs, root = st.filesystem(out_url, storage)
    done = is_prepared(fs, root, video_id, source_url, settings)
    if done is not None:
        return done | {"status": "skipped"}
    dst = video_path(root, video_id)
    for stale in fs.glob(f"{dst}.partial-*") + fs.glob(f"{record_path(root, video_id)}.partial-*"):
        fs.rm_file(stale)  # left by a killed run (one job per output folder)
    try:
        with tempfile.TemporaryDirectory(prefix="re2tal-prepare-") as tmp:
            src = _local_copy(source_url, tmp, storage)
            source = VideoFile(src)
            local = os.path.join(tmp, "out.mp4")
            try:
                transcode(src, local, settings)
            except (av.FFmpegError, ValueError) as err:
                raise VideoError(f"cannot transcode: {_reason(err)}") from err
            out = check_output(source, local, settings)
            record = {"id": video_id, "source": source_url, "settings": asdict(settings), "source_info": source.info.to_dict(),
                      "info": out.info.to_dict(), "source_bytes": os.path.getsize(src), "bytes": os.path.getsize(local)}
            if st.protocol(out_url) == "file":
                fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            _put_file(fs, local, dst)
    except VideoError as err:
        return {"id": video_id, "source": source_url, "status": "failed", "reason": str(err)}
    put_bytes(fs, record_path(root, video_id), json.dumps(record).encode())
    return record | {"status": "prepared"}


def _local_copy(url: str, folder: str, storage: StorageConfig) -> str:
    """A local path of the source: local files in place, remote ones fetched into `folder`."""
    try:
        if st.is_local(url):
            _, path = st.filesystem(url, storage)
            with open(path, "rb"):
                pass
            return path
        path = os.path.join(folder, "source" + os.path.splitext(url)[1][:16])
        st.fetch(url, path, storage)
        return path
    except Exception as err:
        if isinstance(err, OSError) or st.transient(err):
            raise VideoError(f"cannot fetch: {_reason(err)}") from err
        raise


def _put_file(fs, local: str, path: str) -> None:
    """Upload under a temporary name, then move into place: nothing partial under `path`."""
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    fs.put_file(local, tmp)
    fs.mv(tmp, path)


def put_bytes(fs, path: str, data: bytes) -> None:
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def prepared_annotations(tree: dict, records: dict[str, dict]) -> dict:
    """The source annotation tree with the prepared videos' urls pointing at their copies
    (relative to the output folder) and their prepared fps / resolution; videos that could not be
    prepared are left out. Durations and segments are unchanged."""
    database = {}
    for vid, entry in tree["database"].items():
        record = records.get(vid)
        if record is None:
            continue
        info = record["info"]
        database[vid] = {**entry, "url": f"videos/{vid}.mp4", "fps": info["fps"], "resolution": f"{info['width']}x{info['height']}"}
    return {**tree, "database": database}

