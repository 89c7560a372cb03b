"""A collection of videos named on the command line (`--videos`): one video URL, a prefix (every
video file under it), or an ActivityNet-format annotation file (the videos of some of its subsets).

    videos = collection("s3://bucket/videos/", data, storage)      # every *.mp4, *.mkv, ... under it
    videos = collection("s3://b/anet.json", data, storage, ["validation"])

Each video is a `Video` (re2tal.data.annotations): from an annotation file as that file says
(`url`, or `<video_root>/<video_prefix><id>.<video_ext>` by `data`), with its segments; from a URL
or a prefix its id is the file name without its extension (two files of one name under a prefix
are refused: ids name the outputs), its duration 0 (unknown until decoded) and no segments.
"""

from __future__ import annotations

import posixpath

import numpy as np

from re2tal.config import DataConfig, StorageConfig
from re2tal.data import storage as st
from re2tal.data.annotations import Video, load_annotations
from re2tal.errors import BadInput

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")


def is_annotations(spec: str) -> bool:
    return spec.lower().endswith(".json")


def collection(spec: str, data: DataConfig, storage: StorageConfig, subsets: list[str] | None = None,
               flag: str = "--videos") -> list[Video]:
    """The videos `spec` names (see the module docstring). `data` says where an annotation
    file's videos are; `subsets` (annotation files only): which subsets, None for all. BadInput
    names `flag` (or --subset) when there is nothing to do."""
    if is_annotations(spec):
        return _annotated(data.model_copy(update={"annotations": spec}), storage, subsets)
    if subsets:
        raise BadInput(f"--subset: only an annotation file has subsets, and {flag} {spec} is not one (*.json)")
    fs, path = st.filesystem(spec, storage)
    try:
        folder = spec.endswith("/") or fs.isdir(path)
        if not folder and not fs.exists(path):
            raise BadInput(f"{flag}: {spec} does not exist")
        files = sorted(p for p in fs.find(path) if p.lower().endswith(VIDEO_EXTS)) if folder else [path]
    except OSError as err:
        raise BadInput(f"{flag}: cannot list {spec} ({err.__class__.__name__}: {err})") from None
    if not files:
        raise BadInput(f"{flag}: no video files ({', '.join(VIDEO_EXTS)}) under {spec}")
    scheme = spec.split("://", 1)[0] + "://" if "://" in spec else ""
    videos, seen = [], {}
    for i, file in enumerate(files):
        name = posixpath.basename(file).rsplit(".", 1)[0]
        if name in seen:
            raise BadInput(f"{flag}: two videos named {name!r} under {spec} ({seen[name]}, {file}); the id names the outputs")
        seen[name] = file
        url = file if not scheme or file.startswith(scheme) else scheme + file
        videos.append(Video(id=name, url=url if folder else spec, duration=0.0, subset="", index=i,
                            segments=np.zeros((0, 2), np.float32), labels=np.zeros(0, np.int64)))
    return videos


def _annotated(data: DataConfig, storage: StorageConfig, subsets: list[str] | None) -> list[Video]:
    annotations = load_annotations(data, storage)
    if subsets is None:
        return annotations.videos
    videos = []
    for subset in subsets:
        try:
            videos += annotations.subset(subset)
        except BadInput as err:
            raise BadInput(f"--subset: {err}") from None
    return videos
