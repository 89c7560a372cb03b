"""Post-processing against a port of OpenTAD's (github.com/sming256/OpenTAD, commit 3dd7b03):
candidate selection, Gaussian Soft-NMS with its tIoU epsilon and tie order, boundary voting, the
class-agnostic and the multi-class path, and a video seen in several sliding windows.

The `opentad_*` functions below are ports of their code, kept line for line where it matters:
- opentad/models/utils/post_processing/nms/nms_cpu.cpp:67-163 (softnms_1d_cpu), as a scalar loop
  in float32;
- opentad/models/utils/post_processing/nms/nms.py:35-61 (SoftNMSop), 64-98 (seg_voting) and
  101-208 (batched_nms);
- opentad/models/detectors/single_stage.py:106-138 (candidates per clip, NMS when not sliding);
- opentad/cores/test_engine.py:100-115 (sliding windows: one batched_nms per video over every
  window's candidates, in seconds, cut to [0, duration] by convert_to_seconds,
  opentad/models/utils/post_processing/utils.py:61-64).
Left out on purpose: their rounding of the sliding-window candidates to 0.01 s / 1e-4 score before
the per-video NMS (test_engine.py:122-124, a by-product of collecting results as JSON-like dicts),
and their grid -> seconds map (they put point p at p / L * duration; ours is re2tal.detection.grid's
centre convention): both sides here map grid to seconds with `grid_to_seconds`.
"""

import math

import numpy as np
import pytest
import torch

from re2tal.config import NmsConfig
from re2tal.detection import DetectorOutput, grid_to_seconds, postprocess, soft_nms, to_predictions


# ------------------------------------------------------------------------------------------
# the port


def opentad_softnms_1d(segs: torch.Tensor, scores: torch.Tensor, sigma: float, min_score: float):
    """nms_cpu.cpp:67-163 with method=2 (gaussian); returns (inds, dets (n, 3))."""
    f32 = np.float32
    x1 = [f32(v) for v in segs[:, 0].tolist()]
    x2 = [f32(v) for v in segs[:, 1].tolist()]
    sc = [f32(v) for v in scores.tolist()]
    areas = [f32(b - a + f32(1e-6)) for a, b in zip(x1, x2)]  # x2_t - x1_t + 1e-6
    nsegs = len(sc)
    inds = list(range(nsegs))
    de = [[f32(0)] * 3 for _ in range(nsegs)]
    i = 0
    while i < nsegs:
        max_score, max_pos = sc[i], i
        pos = i + 1
        while pos < nsegs:
            if max_score < sc[pos]:
                max_score, max_pos = sc[pos], pos
            pos += 1
        ix1 = de[i][0] = x1[max_pos]
        ix2 = de[i][1] = x2[max_pos]
        iscore = de[i][2] = sc[max_pos]
        iarea, iind = areas[max_pos], inds[max_pos]
        x1[max_pos], x2[max_pos], sc[max_pos], areas[max_pos], inds[max_pos] = x1[i], x2[i], sc[i], areas[i], inds[i]
        x1[i], x2[i], sc[i], areas[i], inds[i] = ix1, ix2, iscore, iarea, iind
        pos = i + 1
        while pos < nsegs:
            xx1, xx2 = max(ix1, x1[pos]), min(ix2, x2[pos])
            inter = max(f32(0), f32(xx2 - xx1))
            ovr = f32(inter / f32(iarea + areas[pos] - inter))
            weight = f32(math.exp(f32(-(ovr * ovr) / f32(sigma))))
            sc[pos] = f32(sc[pos] * weight)
            if sc[pos] < f32(min_score):
                last = nsegs - 1
                x1[pos], x2[pos], sc[pos], areas[pos], inds[pos] = x1[last], x2[last], sc[last], areas[last], inds[last]
                nsegs -= 1
                pos -= 1
            pos += 1
        i += 1
    return torch.tensor(inds[:nsegs], dtype=torch.long), torch.tensor(de, dtype=torch.float32).reshape(-1, 3)


def opentad_softnms_op(segs, scores, cls_idxs, sigma, min_score, max_num):
    """nms.py:35-61 (SoftNMSop.forward)."""
    inds, dets = opentad_softnms_1d(segs, scores, sigma, min_score)
    n_segs = min(len(inds), max_num) if max_num > 0 else len(inds)
    return dets[:n_segs, :2].clone(), dets[:n_segs, 2].clone(), cls_idxs[inds][:n_segs].clone()


def opentad_seg_voting(nms_segs, all_segs, all_scores, iou_threshold):
    """nms.py:64-98."""
    num_nms_segs, num_all_segs = nms_segs.shape[0], all_segs.shape[0]
    ex_nms_segs = nms_segs[:, None].expand(num_nms_segs, num_all_segs, 2)
    ex_all_segs = all_segs[None, :].expand(num_nms_segs, num_all_segs, 2)
    left = torch.maximum(ex_nms_segs[:, :, 0], ex_all_segs[:, :, 0])
    right = torch.minimum(ex_nms_segs[:, :, 1], ex_all_segs[:, :, 1])
    inter = (right - left).clamp(min=0)
    nms_seg_lens = ex_nms_segs[:, :, 1] - ex_nms_segs[:, :, 0]
    all_seg_lens = ex_all_segs[:, :, 1] - ex_all_segs[:, :, 0]
    iou = inter / (nms_seg_lens + all_seg_lens - inter)
    seg_weights = (iou >= iou_threshold).to(all_scores.dtype) * all_scores[None, :]
    seg_weights /= torch.sum(seg_weights, dim=1, keepdim=True)
    return seg_weights @ all_segs


def opentad_batched_nms(segs, scores, cls_idxs, min_score, max_seg_num, multiclass, sigma, voting_thresh):
    """nms.py:101-208 with use_soft_nms=True, method=2."""
    segs, scores = segs.float(), scores.float()
    if segs.shape[0] == 0:
        return torch.zeros([0, 2]), torch.zeros([0]), torch.zeros([0], dtype=cls_idxs.dtype)
    if multiclass:
        new_segs, new_scores, new_cls_idxs = [], [], []
        for class_id in torch.unique(cls_idxs):
            curr_indices = torch.where(cls_idxs == class_id)[0]
            s, sc, c = opentad_softnms_op(segs[curr_indices], scores[curr_indices], cls_idxs[curr_indices], sigma, min_score,
                                          max_seg_num)
            new_segs.append(s)
            new_scores.append(sc)
            new_cls_idxs.append(c)
        new_segs, new_scores, new_cls_idxs = torch.cat(new_segs), torch.cat(new_scores), torch.cat(new_cls_idxs)
    else:
        new_segs, new_scores, new_cls_idxs = opentad_softnms_op(segs, scores, cls_idxs, sigma, min_score, max_seg_num)
        if voting_thresh > 0:
            new_segs = opentad_seg_voting(new_segs, segs, scores, voting_thresh)
    _, idxs = new_scores.sort(descending=True)
    max_seg_num = min(max_seg_num, new_segs.shape[0])
    return new_segs[idxs[:max_seg_num]], new_scores[idxs[:max_seg_num]], new_cls_idxs[idxs[:max_seg_num]]


def opentad_candidates(proposals, scores, pre_nms_thresh=0.001, pre_nms_topk=2000):
    """single_stage.py:106-134 for one clip: proposals (N, 2), scores (N, K) after sigmoid, real points only."""
    num_classes = scores.shape[-1]
    if num_classes == 1:
        return proposals, scores.squeeze(-1), torch.zeros(scores.shape[0]).long()
    pred_prob = scores.flatten()
    keep_idxs1 = pred_prob > pre_nms_thresh
    pred_prob = pred_prob[keep_idxs1]
    topk_idxs = keep_idxs1.nonzero(as_tuple=True)[0]
    num_topk = min(pre_nms_topk, topk_idxs.size(0))
    pred_prob, idxs = pred_prob.sort(descending=True)
    pred_prob = pred_prob[:num_topk].clone()
    topk_idxs = topk_idxs[idxs[:num_topk]].clone()
    pt_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
    return proposals[pt_idxs], pred_prob, torch.fmod(topk_idxs, num_classes)


def opentad_cut(segments, duration):
    """utils.py:61-64 (convert_to_seconds' truncation to [0, duration])."""
    segments = segments.clone()
    if segments.shape[0] > 0:
        segments[segments <= 0.0] *= 0.0
        segments[segments >= duration] = segments[segments >= duration] * 0.0 + duration
    return segments


def opentad_kwargs(cfg: NmsConfig) -> dict:
    return dict(min_score=cfg.min_score, max_seg_num=cfg.max_segments, multiclass=not cfg.class_agnostic, sigma=cfg.sigma,
                voting_thresh=cfg.voting_threshold)


# ------------------------------------------------------------------------------------------
# fixed scored segments


def scored_segments(n: int, classes: int, seed: int, length: float = 64.0):
    """Clusters of overlapping segments (so NMS decays and voting averages), a few duplicates
    with equal scores (ties), a few past the window's ends; grid units."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, length, n // 4 + 1)
    c = np.repeat(centres, 4)[:n] + rng.normal(0, 1.0, n)
    half = np.repeat(rng.uniform(1, 8, n // 4 + 1), 4)[:n] * rng.uniform(0.8, 1.25, n)
    seg = np.stack([c - half, c + half], 1).astype(np.float32)
    score = rng.choice(np.linspace(0.002, 0.95, 40), n).astype(np.float32)  # a small set: many ties
    seg[5], score[5] = seg[4], score[4]  # an exact duplicate
    label = rng.integers(0, classes, n)
    return seg, score, label


def as_clip(seg, score, label):
    return {"segments": torch.from_numpy(seg), "scores": torch.from_numpy(score), "labels": torch.from_numpy(label).long()}


# ------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("sigma,min_score,max_segments", [(0.7, 0.001, 100), (0.3, 0.05, 7), (0.75, 0.0, 1000)])
def test_soft_nms_equals_opentads_loop_including_ties_and_drops(sigma, min_score, max_segments):
    seg, score, _ = scored_segments(90, 1, seed=3)
    seg[10] = seg[11] = [5.0, 5.0]  # zero length: tIoU only defined through the 1e-6
    keep, kept = soft_nms(seg, score, sigma, min_score, max_segments)
    inds, dets = opentad_softnms_1d(torch.from_numpy(seg), torch.from_numpy(score), sigma, min_score)
    n = min(len(inds), max_segments)
    assert keep.tolist() == inds[:n].tolist()
    np.testing.assert_array_equal(seg[keep], dets[:n, :2].numpy())
    np.testing.assert_allclose(kept, dets[:n, 2].numpy(), rtol=2e-6)


def test_soft_nms_tie_goes_to_the_first_in_the_working_order():
    # three equal scores, disjoint segments; picking 2 first swaps it with 0, so 1 now comes before 0
    seg = np.array([[0, 10], [20, 30], [40, 50], [60, 70]], np.float32)
    score = np.array([0.5, 0.5, 0.9, 0.5], np.float32)
    keep, _ = soft_nms(seg, score, 0.5, 0.001, 10)
    inds, _ = opentad_softnms_1d(torch.from_numpy(seg), torch.from_numpy(score), 0.5, 0.001)
    assert keep.tolist() == inds.tolist() == [2, 1, 0, 3]
    # a dropped segment's place is taken by the last one, which then comes before its equal
    seg = np.array([[0, 10], [0, 10], [40, 50], [60, 70]], np.float32)
    score = np.array([0.9, 0.0015, 0.5, 0.5], np.float32)
    keep, _ = soft_nms(seg, score, 0.5, 0.001, 10)
    inds, _ = opentad_softnms_1d(torch.from_numpy(seg), torch.from_numpy(score), 0.5, 0.001)
    assert keep.tolist() == inds.tolist() == [0, 3, 2]


def test_candidates_equal_opentads_selection():
    torch.manual_seed(0)
    for K in (1, 5):
        levels, L = 3, 16
        logits = [torch.randn(2, L >> lv, K) * 3 for lv in range(levels)]
        offsets = [torch.rand(2, L >> lv, 2) * 3 for lv in range(levels)]
        masks = [torch.arange(L >> lv)[None].expand(2, -1) < torch.tensor([[L >> lv], [(L >> lv) // 2 + 1]]) for lv in range(levels)]
        points = [torch.arange(L >> lv, dtype=torch.float32) * 2**lv for lv in range(levels)]
        out = DetectorOutput(logits, offsets, masks, points, [2**lv for lv in range(levels)], L)
        cfg = NmsConfig(pre_nms_topk=20, min_length=0.0)
        ours = postprocess(out, cfg)
        # anchor_free_head.py:144-165: proposals of every point, real ones only
        flat_logits, flat_off, flat_mask, flat_points, flat_strides = out.flat()
        for b in range(2):
            start = flat_points - flat_off[b, :, 0] * flat_strides
            end = flat_points + flat_off[b, :, 1] * flat_strides
            real = flat_mask[b]
            seg, score, label = opentad_candidates(torch.stack([start, end], -1)[real], flat_logits[b][real].sigmoid(),
                                                   cfg.pre_nms_threshold, cfg.pre_nms_topk)
            torch.testing.assert_close(ours[b]["segments"], seg)
            torch.testing.assert_close(ours[b]["scores"], score)
            assert ours[b]["labels"].tolist() == label.tolist()


@pytest.mark.parametrize("class_agnostic,classes", [(True, 1), (False, 4), (True, 4)])
def test_one_clip_per_video_equals_opentad(class_agnostic, classes):
    """ActivityNet's path (and the multi-class one, where their batched_nms skips voting): one
    whole-video clip, NMS on its grid, then seconds and the cut to [0, duration]."""
    cfg = NmsConfig(sigma=0.7, max_segments=100 if class_agnostic else 40, min_score=0.001, class_agnostic=class_agnostic,
                    voting_threshold=0.9 if classes == 1 else 0.7)
    L, duration = 64, 123.4
    seg, score, label = scored_segments(160, classes, seed=classes)
    pred = to_predictions([as_clip(seg, score, label)], ["v"], [(0.0, duration)], [duration], [f"c{k}" for k in range(classes)],
                          cfg, L, sliding=False)["results"]["v"]
    s, sc, c = opentad_batched_nms(torch.from_numpy(seg), torch.from_numpy(score), torch.from_numpy(label), **opentad_kwargs(cfg))
    s = opentad_cut(torch.from_numpy(grid_to_seconds(s.double().numpy(), (0.0, duration), L)), duration)
    keep = s[:, 1] > s[:, 0]
    want = sorted(zip(sc[keep].tolist(), c[keep].tolist(), s[keep].tolist()), key=lambda r: -r[0])
    assert len(pred) == len(want) > 20
    assert [e["label"] for e in pred] == [f"c{k}" for _, k, _ in want]
    np.testing.assert_allclose([e["score"] for e in pred], [w[0] for w in want], rtol=1e-6)
    np.testing.assert_allclose([e["segment"] for e in pred], [w[2] for w in want], rtol=1e-5, atol=1e-4)
    if class_agnostic:  # voting moved boundaries away from the kept candidates'
        plain = to_predictions([as_clip(seg, score, label)], ["v"], [(0.0, duration)], [duration], [f"c{k}" for k in range(classes)],
                               cfg.model_copy(update={"voting_threshold": 0.0}), L, sliding=False)["results"]["v"]
        assert [e["segment"] for e in plain] != [e["segment"] for e in pred]


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_video_in_several_windows_equals_opentad(class_agnostic):
    """THUMOS's path: no NMS per window; each window's candidates to seconds, cut to the video,
    all windows of a video in one batched_nms."""
    cfg = NmsConfig(sigma=0.7, max_segments=2000 if not class_agnostic else 100, min_score=0.001,
                    class_agnostic=class_agnostic, voting_threshold=0.7)
    L, duration, classes = 64, 100.0, 1 if class_agnostic else 3
    windows = [(-0.1, 39.9), (19.9, 59.9), (39.9, 79.9), (60.0, 100.0)]  # end-aligned last window
    clips = [scored_segments(120, classes, seed=10 + w) for w in range(len(windows))]
    pred = to_predictions([as_clip(*c) for c in clips], ["v"] * len(windows), windows, [duration] * len(windows),
                          [f"c{k}" for k in range(classes)], cfg, L, sliding=True)["results"]["v"]
    segs = torch.cat([opentad_cut(torch.from_numpy(grid_to_seconds(seg.astype(np.float64), w, L)), duration)
                      for (seg, _, _), w in zip(clips, windows)])
    scores = torch.cat([torch.from_numpy(score) for _, score, _ in clips])
    labels = torch.cat([torch.from_numpy(label) for _, _, label in clips])
    s, sc, c = opentad_batched_nms(segs, scores, labels, **opentad_kwargs(cfg))
    keep = s[:, 1] > s[:, 0]
    want = sorted(zip(sc[keep].tolist(), c[keep].tolist(), s[keep].tolist()), key=lambda r: -r[0])
    assert len(pred) == len(want) > 50
    np.testing.assert_allclose([e["score"] for e in pred], [w[0] for w in want], rtol=1e-6)
    assert sorted((round(e["score"], 5), e["label"]) for e in pred) == sorted((round(w[0], 5), f"c{w[1]}") for w in want)
    np.testing.assert_allclose(sorted(e["segment"] for e in pred), sorted(w[2] for w in want), rtol=1e-5, atol=1e-4)
    # once per video, not per window and again at the merge: a kept segment's score is decayed
    # only by the segments picked before it in this one pass
    assert max(e["score"] for e in pred) == pytest.approx(max(float(score.max()) for _, score, _ in clips))
