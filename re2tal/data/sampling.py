"""Which moments of a long video a clip samples, in seconds (pure numpy, no decoding).

A clip of N frames samples a `Window` [start, end) uniformly: sample i stands for the interval
[start + i*d, start + (i+1)*d), d = (end - start) / N, and shows the frame on screen at its centre
start + (i + 0.5) * d, or, with temporal jitter, at a uniformly random time inside the interval.
The same formula maps any feature grid over the clip back to seconds (`centres`), so the mapping
between feature index and time is exact whatever the frame rate (29.97, variable) and however
short the video. Samples whose centre lies past the end of the video are padding: `valid` counts
the real ones, which always come first.

- uniform (ActivityNet): one window (0, duration); a video shorter than N frames repeats frames.
- sliding (THUMOS): windows of N samples one step (frame_interval / fps) apart, placed so each
  sample's centre is the centre of a frame (frames 0, k, 2k, ... for frame_interval k; the first
  window starts (k - 1) / 2 frames before 0). Evaluation takes every window, `stride` samples
  apart, the last one padded or moved back to end at the video's last sample; training takes one
  window, at a random place overlapping a random action if truncating (or by OpenTAD's
  random_trunc rule, `truncated_window`), else the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    valid: int  # samples [0, valid) are real (inside the video, or a cropped window), the rest is padding
    min_inside: float = 0.0  # targets: only segments with at least this fraction of their length in the real part

    def centres(self, n: int) -> np.ndarray:
        """Times (s) of the centres of n equal steps over the window: start + (i + 0.5) * (end - start) / n."""
        return self.start + (np.arange(n) + 0.5) * ((self.end - self.start) / n)


def window(start: float, step: float, num_frames: int, duration: float) -> Window:
    """The window of `num_frames` samples `step` seconds apart from `start`."""
    w = Window(start, start + num_frames * step, num_frames)
    valid = int(np.count_nonzero(w.centres(num_frames) < duration))
    return Window(w.start, w.end, max(1, valid))


def uniform_window(duration: float, num_frames: int) -> Window:
    return Window(0.0, float(duration), num_frames)


def samples_in(duration: float, start: float, step: float) -> int:
    """How many samples `step` s apart from a window starting at `start` have their centre inside the video."""
    return max(1, math.ceil((duration - start) / step - 0.5 - 1e-6))


def sliding_windows(duration: float, step: float, num_frames: int, stride: int, first_centre: float | None = None,
                    end_aligned: bool = False) -> list[Window]:
    """Every window of an evaluation pass: starts `stride` samples apart, the last reaching the end.

    `first_centre`: time of the first sample (default step / 2, the window starting at 0); the
    centre of frame 0 (0.5 / fps) makes every sample fall on a frame's centre, never on a boundary
    between two frames. `end_aligned`: the last window, instead of running past the end with
    padding, is moved back to end at the video's last sample (OpenTAD's sliding windows, from a
    whole sample; a video shorter than a window still gets one padded window)."""
    start = 0.0 if first_centre is None else first_centre - step / 2
    extra = (duration - start) / step - num_frames
    count = 1 if extra <= 1e-6 else math.ceil(extra / stride - 1e-6) + 1
    windows = [window(start + j * stride * step, step, num_frames, duration) for j in range(count)]
    last = samples_in(duration, start, step) - num_frames
    if end_aligned and count > 1:
        windows = windows[:-1] + ([window(start + last * step, step, num_frames, duration)] if last > (count - 2) * stride else [])
    return windows


def truncated_window(duration: float, step: float, num_frames: int, rng: np.random.Generator, segments: np.ndarray,
                     threshold: float, crop_ratio: tuple[float, float] | None = None, first_centre: float | None = None,
                     trials: int = 200) -> Window:
    """A training window by OpenTAD's random_trunc (LoadFrames, datasets/transforms/end_to_end.py:199-242), on
    whole samples: of the video's n samples, L = num_frames; a video with n <= L is taken whole
    unless `crop_ratio` (lo, hi) cuts it to a random length L in [round(lo n), round(hi n)] (if
    L < n); then up to `trials` starts uniform in [0, n - L] until the window's real part
    holds at least `threshold` of some segment (M, 2) s. The window keeps N samples (the rest
    padding); only segments with `threshold` of their length inside are its targets."""
    start = 0.0 if first_centre is None else first_centre - step / 2
    n, length = samples_in(duration, start, step), num_frames
    if n <= num_frames:
        if crop_ratio is None:
            return window(start, step, num_frames, duration)
        length = int(rng.integers(max(round(crop_ratio[0] * n), 1), min(round(crop_ratio[1] * n), n), endpoint=True))
        if length == n:
            return window(start, step, num_frames, duration)
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    for _ in range(trials):
        first = start + int(rng.integers(0, n - length, endpoint=True)) * step
        inter = np.clip(np.minimum(segments[:, 1], first + length * step) - np.maximum(segments[:, 0], first), 0, None)
        with np.errstate(invalid="ignore", divide="ignore"):
            if np.any(inter / (segments[:, 1] - segments[:, 0]) >= threshold):
                break
    return Window(first, first + num_frames * step, min(length, samples_in(duration, first, step)), threshold)


def random_window(duration: float, step: float, num_frames: int, rng: np.random.Generator,
                  segments: np.ndarray | None = None) -> Window:
    """A window at a random place inside the video (random truncation for training): uniformly
    among those overlapping a randomly chosen segment of `segments` (M, 2), if any, else anywhere."""
    span = num_frames * step
    if duration <= span:
        return window(0.0, step, num_frames, duration)
    lo, hi = 0.0, duration - span
    if segments is not None and len(segments):
        s, e = segments[rng.integers(len(segments))]
        lo, hi = max(lo, s - span), min(hi, e)  # starts whose window overlaps [s, e)
        if lo > hi:  # a segment outside the video's decoded length: anywhere
            lo, hi = 0.0, duration - span
    return window(float(rng.uniform(lo, hi)), step, num_frames, duration)


def clip_window(start: float, end: float, duration: float, step: float | None, num_frames: int,
                rng: np.random.Generator | None) -> Window:
    """The window of a recognition clip [start, end) of a file `duration` s long (end clipped to it):
    `step` None (uniform) spans the whole clip; else num_frames samples `step` s apart, at a
    random place inside the clip when `rng` is given (training), else centred (evaluation), as
    mmaction's SampleFrames; a clip shorter than that is padded at its end."""
    end = min(end, duration)
    start = min(start, max(0.0, end - 1e-3))
    if step is None:
        return Window(start, end, num_frames)
    span = num_frames * step
    room = max(0.0, (end - start) - span)
    offset = float(rng.uniform(0, room)) if rng is not None else room / 2
    return window(start + offset, step, num_frames, end)


def sample_times(w: Window, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """(num_frames,) time (s) of each sample: interval centres, or uniform within the interval
    with jitter (`rng`). Padding samples repeat the last valid one."""
    step = (w.end - w.start) / num_frames
    offsets = rng.random(num_frames) if rng is not None else np.full(num_frames, 0.5)
    times = w.start + (np.arange(num_frames) + offsets) * step
    times[w.valid:] = times[w.valid - 1]
    return times


def segments_in(w: Window, duration: float, segments: np.ndarray, labels: np.ndarray, num_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The segments (M, 2) overlapping the window's real part (its first `valid` of `num_frames`
    samples, and inside the video), clipped to it, and their labels; with w.min_inside, only those
    with at least that fraction of their length inside."""
    lo, hi = w.start, min(w.end, duration)
    if num_frames is not None:
        hi = min(hi, w.start + w.valid * (w.end - w.start) / num_frames)
    inside = np.minimum(segments[:, 1], hi) - np.maximum(segments[:, 0], lo)
    keep = inside > 0
    if w.min_inside > 0:
        with np.errstate(invalid="ignore", divide="ignore"):
            keep &= inside / (segments[:, 1] - segments[:, 0]) >= w.min_inside
    clipped = np.clip(segments[keep], lo, hi).astype(np.float32)
    return clipped.reshape(-1, 2), labels[keep].astype(np.int64)
