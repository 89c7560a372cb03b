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
  apart, the last one padded; training takes one window, at a random place overlapping a random
  action if truncating, else the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    valid: int  # samples [0, valid) lie inside the video, the rest is padding

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


def sliding_windows(duration: float, step: float, num_frames: int, stride: int, first_centre: float | None = None) -> list[Window]:
    """Every window of an evaluation pass: starts `stride` samples apart, the last reaching the end.

    `first_centre`: time of the first sample (default step / 2, the window starting at 0); the
    centre of frame 0 (0.5 / fps) makes every sample fall on a frame's centre, never on a boundary
    between two frames."""
    start = 0.0 if first_centre is None else first_centre - step / 2
    extra = (duration - start) / step - num_frames
    count = 1 if extra <= 1e-6 else math.ceil(extra / stride - 1e-6) + 1
    return [window(start + j * stride * step, step, num_frames, duration) for j in range(count)]


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


def segments_in(w: Window, duration: float, segments: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments (M, 2) overlapping the window's real part, clipped to it, and their labels."""
    lo, hi = w.start, min(w.end, duration)
    keep = (np.minimum(segments[:, 1], hi) - np.maximum(segments[:, 0], lo)) > 0
    clipped = np.clip(segments[keep], lo, hi).astype(np.float32)
    return clipped.reshape(-1, 2), labels[keep].astype(np.int64)
