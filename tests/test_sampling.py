"""Training and evaluation windows on sliding-window datasets (THUMOS) against a port of OpenTAD's
(github.com/sming256/OpenTAD, commit 3dd7b03):
- random truncation: `LoadFrames.random_trunc`, opentad/datasets/transforms/end_to_end.py:199-242
  (trunc_thresh, crop_ratio), driven by the same random draws as ours;
- evaluation windows: `SlidingWindowDataset.split_video_to_windows`,
  opentad/datasets/base/sliding_dataset.py:96-158 (the last window moved back to the video's end).
Units: one sample of ours is one entry of their frame-index list (`frame_idxs`); segments in
seconds are t = start + u * step for u in sample units."""

import math

import numpy as np
import pytest

from re2tal.config import validate
from re2tal.data import sampling
from re2tal.data.dataset import plan_windows
from re2tal.data.annotations import Video
from re2tal.data.video import VideoInfo


def opentad_random_trunc(feats, trunc_len, gt_segments, gt_labels, trunc_thresh, crop_ratio, randint, offset=0, max_num_trials=200):
    """end_to_end.py:199-242, with `random.randint` passed in as `randint`."""
    feat_len = feats.shape[0]
    num_segs = gt_segments.shape[0]
    trunc_len = trunc_len
    if feat_len <= trunc_len:
        if crop_ratio == None:  # noqa: E711 (as theirs)
            return feats, gt_segments, gt_labels
        else:
            trunc_len = randint(max(round(crop_ratio[0] * feat_len), 1), min(round(crop_ratio[1] * feat_len), feat_len))
            if feat_len == trunc_len:
                return feats, gt_segments, gt_labels
    for _ in range(max_num_trials):
        st = randint(0, feat_len - trunc_len)
        ed = st + trunc_len
        window = np.array([st, ed], dtype=np.float32)
        window = np.repeat(window[None, :], num_segs, axis=0)
        left = np.maximum(window[:, 0] - offset, gt_segments[:, 0])
        right = np.minimum(window[:, 1] + offset, gt_segments[:, 1])
        inter = np.clip(right - left, a_min=0, a_max=None)
        area_segs = np.abs(gt_segments[:, 1] - gt_segments[:, 0])
        inter_ratio = inter / area_segs
        seg_idx = inter_ratio >= trunc_thresh
        if seg_idx.sum().item() > 0:
            break
    feats = feats[st:ed]
    gt_segments = np.stack((left[seg_idx], right[seg_idx]), axis=1)
    gt_segments = gt_segments - st
    gt_labels = gt_labels[seg_idx]
    return feats, gt_segments, gt_labels


def opentad_window_starts(snippet_num, window_size, window_overlap_ratio):
    """sliding_dataset.py:55-56 and 103-158 (no ground truth: every window is kept)."""
    window_stride = int(window_size * (1 - window_overlap_ratio))
    starts = []
    for idx in range(max(1, snippet_num // window_stride)):
        window_start = idx * window_stride
        window_end = window_start + window_size
        last_window = False
        if window_end > snippet_num:
            window_end = snippet_num
            window_start = max(0, window_end - window_size)
            last_window = True
        starts.append(window_start)
        if last_window:
            break
    return starts


class Draws:
    """random.randint(a, b) (both ends included) from a numpy generator, as ours draws."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __call__(self, a, b):
        return int(self.rng.integers(a, b, endpoint=True))


@pytest.mark.parametrize("n,segments_u", [
    (700, [[40, 90], [300, 301.5], [520, 690]]),  # long video: trials until one holds 75% of a segment
    (150, [[10, 40], [100, 149]]),  # shorter than a window: cropped to 90-100%
    (2000, [[1500, 1700]]),  # one action far from most starts: many trials
    (500, []),  # no action
])
def test_truncation_equals_opentads_random_trunc(n, segments_u):
    N, step, start0, duration = 128, 0.2, -0.05, None
    duration = start0 + (n - 0.25) * step  # n sample centres inside the video
    seg_u = np.array(segments_u, dtype=np.float32).reshape(-1, 2)
    labels = np.arange(len(seg_u))
    seg_s = start0 + seg_u.astype(np.float64) * step
    for seed in range(25):
        w = sampling.truncated_window(duration, step, N, np.random.default_rng(seed), seg_s, 0.75, (0.9, 1.0), start0 + step / 2)
        feats, gt, gl = opentad_random_trunc(np.arange(n), N, seg_u, labels, 0.75, [0.9, 1.0], Draws(seed))
        assert sampling.samples_in(duration, start0, step) == n
        first = round((w.start - start0) / step)
        assert (first, w.valid) == (int(feats[0]), len(feats))
        assert w.end - w.start == pytest.approx(N * step)
        ours, our_labels = sampling.segments_in(w, duration, seg_s, labels, N)
        np.testing.assert_allclose((ours - w.start) / step, gt.reshape(-1, 2), atol=1e-4)
        assert our_labels.tolist() == gl.tolist()


def test_truncation_crops_short_videos_and_pads_the_rest():
    lengths = {sampling.truncated_window(10.0, 0.1, 128, np.random.default_rng(s), np.array([[2.0, 5.0]]), 0.75, (0.9, 1.0)).valid
               for s in range(60)}
    assert min(lengths) == 90 and max(lengths) == 100 and len(lengths) > 5  # of 100 samples
    whole = sampling.truncated_window(10.0, 0.1, 128, np.random.default_rng(0), np.array([[2.0, 5.0]]), 0.75)
    assert (whole.start, whole.valid, whole.min_inside) == (0.0, 100, 0.0)
    times = sampling.sample_times(sampling.Window(0.0, 12.8, 95, 0.75), 128)
    assert np.all(times[95:] == times[94])


@pytest.mark.parametrize("n", list(range(1, 40)) + [255, 256, 257, 1000, 1024, 1279, 1280, 3001])
def test_end_aligned_windows_equal_opentads(n):
    W, S = 16 if n < 40 else 512, 8 if n < 40 else 256  # their THUMOS test set: 50% overlap
    windows = sampling.sliding_windows(float(n), 1.0, W, S, first_centre=0.5, end_aligned=True)
    starts = [round(w.start) for w in windows]
    # theirs repeats the last window when the video is a multiple of the stride long; ours does not
    assert starts == sorted(set(opentad_window_starts(n, W, 0.5)))
    assert all(w.valid == min(W, n) for w in windows)
    assert windows[-1].start + min(W, n) == n  # the last real sample is the video's last


def test_plan_windows_uses_the_configured_rules():
    info = VideoInfo(frames=3000, fps=30.0, duration=100.0, height=180, width=320)
    video = Video("v", "v.mp4", 100.0, "training", np.array([[40.0, 44.0]], np.float32), np.array([0]), 0)
    cfg = validate({"data": {"annotations": "a.json", "sampling": "sliding", "num_frames": 512, "frame_interval": 2,
                             "truncate_threshold": 0.75, "truncate_crop_ratio": [0.9, 1.0], "last_window": "end_aligned"},
                    "head": {"num_classes": 1}})
    [w] = plan_windows(info, video, cfg, True, np.random.default_rng(0))
    assert w.min_inside == 0.75 and w.valid == 512
    assert w.start <= 40 + 0.25 * 4 and w.end >= 44 - 0.25 * 4  # holds 75% of the action
    windows = plan_windows(info, video, cfg, False, np.random.default_rng(0))
    assert [round(w.start * 30 + 0.5) for w in windows] == [0, 512, 1024, 1536, 1976]  # frames; the last ends at frame 2998
    assert math.isclose(windows[-1].end, 100.0 - 1 / 60)
