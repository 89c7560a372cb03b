"""Annotation files of clips for action recognition (`re2tal finetune`): one clip per CSV row.

Two layouts, told apart by the header:

- Kinetics (the CSVs that ship with Kinetics-400/600/700): `label,youtube_id,time_start,time_end,split`
  (an extra `is_cc` column is ignored). The files are the trimmed clips as the Kinetics download
  tools and the CVDF archives name them, `<video_root>/<video_prefix><youtube_id>_<time_start:06d>_<time_end:06d>.<video_ext>`
  (`data.video_root` may hold `{split}`, e.g. `s3://k400/{split}` for the CVDF `train/`, `val/` folders);
  each file is the whole clip. The subset is `split` (Kinetics: train, val, test).
- Clips: columns `label`, `subset`, `url` and / or `id`, optional `start`, `end` (seconds in the
  file). A clip's file is its `url` (a relative one under `data.video_root`), else
  `<video_root>/<video_prefix><id>.<video_ext>`, as in the ActivityNet annotations; without
  `start` / `end` (or with empty cells) the clip is the whole file.

Every clip becomes a `Video` whose `clip` is its (start, end) in the file (end may be inf: the
file's end), with one segment (the clip) and its class; ids are `<youtube_id>_<start>_<end>` or
`<id>@<start>-<end>`, made unique. The label map is the sorted list of labels, as for detection.

`clips_from_detection(tree)` cuts such a set from ActivityNet-format TAL annotations: each
annotated segment is a clip of its class, and each gap between segments (and before the first /
after the last) at least `min_background_s` long is a clip of class `background`.
"""

from __future__ import annotations

import csv
import io
import math
import posixpath
from typing import Iterable

import numpy as np

from re2tal.config import DataConfig, StorageConfig
from re2tal.data import storage as st
from re2tal.data.annotations import Annotations, Video, video_root
from re2tal.errors import BadInput

KINETICS = ("label", "youtube_id", "time_start", "time_end", "split")
CLIP_COLUMNS = ("id", "url", "label", "start", "end", "subset")
BACKGROUND = "background"


def load_clips(data: DataConfig, storage: StorageConfig) -> Annotations:
    """The clips of a CSV annotation file (see the module docstring)."""
    url = data.annotations
    try:
        text = st.read_bytes(url, storage).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BadInput(f"{url}: not a UTF-8 text file ({err})") from None
    except Exception as err:
        if isinstance(err, OSError) or st.transient(err):
            raise BadInput(f"{url}: cannot read annotations ({err.__class__.__name__}: {err})") from None
        raise
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    kinetics = all(c in header for c in KINETICS)
    if not kinetics and not ({"label", "subset"} <= set(header) and {"url", "id"} & set(header)):
        raise BadInput(f"{url}: expected a CSV header with {','.join(KINETICS)} (Kinetics) or label, subset, url and / or id, "
                       f"optional start, end (clips); got {','.join(header) or 'nothing'}")
    root = video_root(data)
    rows = []
    for line, row in enumerate(reader, start=2):
        where = f"{url}: line {line}"
        rows.append(_kinetics_row(row, where, root, data) if kinetics else _clip_row(row, where, root, data))
    if not rows:
        raise BadInput(f"{url}: no clips")
    labels = sorted({r[3] for r in rows})
    ids = {name: i for i, name in enumerate(labels)}
    seen: dict[str, int] = {}
    videos = []
    for index, (vid, file, (start, end), label, subset) in enumerate(rows):
        n = seen[vid] = seen.get(vid, 0) + 1
        videos.append(Video(id=vid if n == 1 else f"{vid}#{n}", url=file, duration=(end - start) if math.isfinite(end) else 0.0,
                            subset=subset, segments=np.asarray([[start, end if math.isfinite(end) else 1e9]], np.float32),
                            labels=np.asarray([ids[label]], np.int64), index=index, clip=(start, end)))
    return Annotations(url=url, videos=videos, labels=labels)


def _cell(row: dict, key: str, where: str, required: bool = True) -> str | None:
    value = (row.get(key) or "").strip()
    if not value:
        if required:
            raise BadInput(f"{where}: {key} is empty")
        return None
    return value


def _seconds(row: dict, key: str, where: str, required: bool) -> float | None:
    value = _cell(row, key, where, required)
    if value is None:
        return None
    try:
        s = float(value)
    except ValueError:
        raise BadInput(f"{where}: {key} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(s) or s < 0:
        raise BadInput(f"{where}: {key} must be a non-negative number of seconds, got {value!r}")
    return s


def _kinetics_row(row: dict, where: str, root: str, data: DataConfig) -> tuple:
    label, yid, split = (_cell(row, k, where) for k in ("label", "youtube_id", "split"))
    start, end = (_seconds(row, k, where, True) for k in ("time_start", "time_end"))
    if end <= start:
        raise BadInput(f"{where}: time_end {end:g} is not after time_start {start:g}")
    name = f"{yid}_{int(start):06d}_{int(end):06d}"
    folder = root.replace("{split}", split)
    return name, f"{folder}/{data.video_prefix}{name}.{data.video_ext}", (0.0, math.inf), label, split


def _clip_row(row: dict, where: str, root: str, data: DataConfig) -> tuple:
    from urllib.parse import urlsplit

    from re2tal.config import check_url

    label, subset = _cell(row, "label", where), _cell(row, "subset", where)
    vid, url = _cell(row, "id", where, required=False), _cell(row, "url", where, required=False)
    if vid is None and url is None:
        raise BadInput(f"{where}: needs an id or a url")
    start = _seconds(row, "start", where, False) or 0.0
    end = _seconds(row, "end", where, False)
    end = math.inf if end is None else end
    if end <= start:
        raise BadInput(f"{where}: end {end:g} is not after start {start:g}")
    if url is not None and data.use_annotation_urls:
        try:
            check_url(url)
        except ValueError as err:
            raise BadInput(f"{where}: url {err}") from None
        relative = not urlsplit(url).scheme and not url.startswith("/")
        file = f"{root}/{url}" if relative else url
    else:
        if vid is None:
            raise BadInput(f"{where}: needs an id (data.use_annotation_urls is false)")
        file = f"{root}/{data.video_prefix}{vid}.{data.video_ext}"
    name = vid if vid is not None else posixpath.basename(url).rsplit(".", 1)[0]
    if row.get("start") or row.get("end"):
        name = f"{name}@{start:g}-{end:g}"
    return name, file, (start, end), label, subset


# --------------------------------------------------------------------------------------------
# a clip set cut from detection annotations


def clips_from_detection(tree: dict, min_background_s: float = 1.0) -> list[dict]:
    """Rows (CLIP_COLUMNS) of a clip set from an ActivityNet-format tree: each segment a clip of
    its class, and per video the longest gap between segments (or before the first / after the
    last), if at least `min_background_s`, a `background` clip (one per video keeps the classes
    about balanced). A video's `url` is kept, else its id names the file."""
    rows = []
    for vid, entry in tree["database"].items():
        ref = {"id": vid, "url": entry.get("url", "")}
        spans = sorted((float(a["segment"][0]), min(float(a["segment"][1]), entry["duration"]), a["label"])
                       for a in entry.get("annotations", []))
        cursor, gap = 0.0, (0.0, 0.0)
        for start, end, label in [*spans, (entry["duration"], entry["duration"], None)]:
            if start - cursor > gap[1] - gap[0]:
                gap = (cursor, start)
            if label is not None and end > start:
                rows.append(ref | {"label": label, "start": round(start, 3), "end": round(end, 3), "subset": entry["subset"]})
            cursor = max(cursor, end)
        if gap[1] - gap[0] >= min_background_s:
            rows.append(ref | {"label": BACKGROUND, "start": round(gap[0], 3), "end": round(gap[1], 3), "subset": entry["subset"]})
    return rows


def clips_csv(rows: Iterable[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CLIP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()
