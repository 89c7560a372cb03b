"""Detection mAP at tIoU thresholds (ActivityNet protocol) and proposal recall, in numpy.

The protocol, per class c and threshold t:
  1. the predictions of class c are sorted by score, descending (equal scores keep file order);
  2. in that order each prediction is matched to the not yet matched ground-truth segment of
     class c in the same video with the highest tIoU >= t (equal tIoUs: the one listed first);
     it is a true positive if there is one, else a false positive (a prediction in a video
     without ground truth is a false positive);
  3. precision_i = TP_i / i and recall_i = TP_i / N_c over the first i predictions; the precision
     is made non-increasing from the right, p~_i = max_{j >= i} precision_j, and
     AP = sum_i (recall_i - recall_{i-1}) * p~_i  (all-point interpolation, VOC 2011).
mAP@t is the mean of AP over the classes that have ground truth (a class without predictions
has AP 0), and average mAP the mean of mAP@t over the thresholds.

Matching is greedy and sequential within each (video, class) group only, so it runs in rounds:
round r matches the r-th candidate prediction of every group at once, for all thresholds at
once. Only (prediction, ground truth) pairs with tIoU >= the lowest threshold take part.
"""

from __future__ import annotations

import re

import numpy as np

from re2tal.errors import BadInput
from re2tal.evaluation.formats import GroundTruth, Predictions, parse_ground_truth, parse_predictions

ANET_THRESHOLDS = np.linspace(0.5, 0.95, 10)
THUMOS_THRESHOLDS = np.linspace(0.3, 0.7, 5)


def parse_thresholds(text: str) -> np.ndarray:
    """"0.5:0.95:0.05" (start:stop:step, stop included) or "0.3,0.5,0.7" -> sorted thresholds."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            values = np.linspace(start, start + (n - 1) * step, n)
        else:
            values = np.array([float(x) for x in re.split(r"[,\s]+", text) if x], dtype=np.float64)
    except ValueError:
        raise BadInput(f"--tiou: {text!r} is not start:stop:step or a comma list of numbers") from None
    if values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise BadInput(f"--tiou: thresholds must lie in (0, 1], got {text!r}")
    return np.unique(values)


def threshold_key(t: float) -> str:
    return f"{t:.2f}"


def segment_tiou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Elementwise tIoU of (N, 2) segments."""
    return _tiou(pred[:, 0], pred[:, 1], gt[:, 0], gt[:, 1])


def _tiou(ps: np.ndarray, pe: np.ndarray, gs: np.ndarray, ge: np.ndarray) -> np.ndarray:
    """|p ∩ g| / (|g| + |p| - |p ∩ g|), in the reference code's order of operations.

    Where the union is empty (both segments are points) it is 1 for the same point and 0 for
    different points (the ActivityNet code divides 0 by 0 there)."""
    inter = np.minimum(pe, ge) - np.maximum(ps, gs)
    np.maximum(inter, 0.0, out=inter)
    union = (ge - gs) + (pe - ps) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, (ps == gs).astype(np.float64))


def average_precision(gt_video: np.ndarray, gt_label: np.ndarray, gt_segment: np.ndarray, num_classes: int,
                      video: np.ndarray, label: np.ndarray, segment: np.ndarray, score: np.ndarray,
                      thresholds: np.ndarray) -> np.ndarray:
    """AP (T, C) of predictions against ground truth, both given as integer codes.

    gt_*: (N,) video and class codes, (N, 2) segments. video, label, segment, score: (M,) codes
    of the predictions (video -1: a video without ground truth; label in [0, num_classes)).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    T = len(thresholds)
    order = _protocol_order(label, score)
    tp_t, tp_index = _greedy_match(gt_video, gt_label, gt_segment, num_classes, video, label, segment, order, thresholds)
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)

    # Only true positives enter the sum: recall steps there, and the interpolated precision at a
    # true positive (the highest precision at or after it) is attained at a true positive, as a
    # false positive's precision is below that of the true positive before it.
    npos = np.bincount(gt_label, minlength=num_classes).astype(np.float64)
    class_size = np.bincount(label, minlength=num_classes)
    class_start = np.cumsum(class_size) - class_size  # where each class begins in protocol order
    tp_pos, tp_class = position[tp_index], label[tp_index]
    by_class = np.lexsort((tp_pos, tp_t, tp_class))
    tp_t, tp_pos, tp_class = tp_t[by_class], tp_pos[by_class], tp_class[by_class]
    bounds = np.searchsorted(tp_class, np.arange(num_classes + 1))
    ap = np.zeros((T, num_classes))
    for c in np.flatnonzero(np.diff(bounds)):
        t = tp_t[bounds[c]:bounds[c + 1]]
        i = (tp_pos[bounds[c]:bounds[c + 1]] - class_start[c] + 1).astype(np.float64)  # rank in class c
        count = np.bincount(t, minlength=T)  # true positives per threshold
        col = np.arange(t.size) - (np.cumsum(count) - count)[t]
        k = col + 1.0  # the k-th true positive: TP_i = k
        precision = np.zeros((T, int(count.max())))  # (T, k), 0 after the last true positive
        precision[t, col] = k / i
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1][t, col]
        step = k / npos[c] - (k - 1) / npos[c]  # recall_i - recall_{i-1}, as the reference computes it
        ap[:, c] = _row_sums(step * envelope, count, count < npos[c])
    return ap


def _row_sums(terms: np.ndarray, count: np.ndarray, closing: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs of `count[t]` terms, each followed by one 0.0 where `closing[t]`,
    summed by np.sum: the same terms in the same order as the VOC / ActivityNet code sums
    (its last term, (1 - recall) * 0, is that zero), so the AP is bit-identical to it."""
    slots = count + closing
    end = np.cumsum(slots)
    shift = (end - slots) - (np.cumsum(count) - count)  # start of a run in `padded` minus in `terms`
    padded = np.zeros(int(end[-1]))
    padded[np.arange(terms.size) + np.repeat(shift, count)] = terms
    return np.array([np.sum(padded[e - n:e]) for e, n in zip(end, slots)])


def _protocol_order(label: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Permutation sorting predictions by class, then score descending, equal scores in file order."""
    order = np.argsort(-score)  # not stable; equal scores are put back in file order below
    s = score[order]
    ties = s[1:] == s[:-1]
    if ties.any():
        order = order[_stable_argsort(np.r_[0, np.cumsum(~ties)], order)]
    return order[_stable_argsort(label[order])]


def _stable_argsort(keys: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """np.lexsort((tiebreak, keys)) for integer keys (tiebreak: a permutation, default the
    position, i.e. a stable sort), using the fastest exact route: radix sort of small keys,
    else one unstable sort of the unique composite key * n + tiebreak."""
    n = keys.size
    if tiebreak is None:
        if n == 0 or (keys.min() >= 0 and keys.max() < 2**15):
            return np.argsort(keys.astype(np.int16), kind="stable")
        tiebreak = np.arange(n)
    if n and max(abs(int(keys.min())), abs(int(keys.max()))) + 1 < np.iinfo(np.int64).max // n:
        return np.argsort(keys.astype(np.int64) * n + tiebreak)
    return np.lexsort((tiebreak, keys))


def _greedy_match(gt_video, gt_label, gt_segment, num_classes, video, label, segment, order, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """True positives as (threshold index, prediction index) pairs; `order` is the protocol
    order (class, score descending)."""
    T, M = len(thresholds), len(video)
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if M == 0:
        return none
    # ground truth grouped by (video, class); within a group in file order
    g_key = gt_video * num_classes + gt_label
    g_order = np.argsort(g_key, kind="stable")
    g_key, g_start, g_end = g_key[g_order], gt_segment[g_order, 0], gt_segment[g_order, 1]
    # predictions grouped by (video, class), within a group in protocol order: as that order is
    # by class already, a stable sort of it by video does it
    by_group = order[_stable_argsort(video[order] + 1)]
    v = video[by_group]
    p_key = np.where(v >= 0, v * num_classes + label[by_group], -1)
    p_seg = segment[by_group]
    p_start, p_end = p_seg[:, 0], p_seg[:, 1]
    heads = np.flatnonzero(np.r_[True, p_key[1:] != p_key[:-1]])
    sizes = np.diff(np.r_[heads, M])
    lo = np.searchsorted(g_key, p_key[heads], side="left")
    n = np.repeat(np.searchsorted(g_key, p_key[heads], side="right") - lo, sizes)

    # one row per (prediction, ground truth of its group); keep those that can match at all
    pair_p = np.repeat(np.arange(M), n)
    pair_g = np.repeat(np.repeat(lo, sizes) - (np.cumsum(n) - n), n) + np.arange(pair_p.size)
    tiou = _tiou(p_start[pair_p], p_end[pair_p], g_start[pair_g], g_end[pair_g])
    keep = tiou >= thresholds.min()
    pair_p, pair_g, tiou = pair_p[keep], pair_g[keep], tiou[keep]
    if pair_p.size == 0:
        return none

    # rank of each candidate (a prediction with a kept pair) among the candidates of its group
    cand = np.zeros(M, dtype=bool)
    cand[pair_p] = True
    seen = np.cumsum(cand)
    head = np.repeat(heads, sizes)
    rank = seen - 1 - (seen[head] - cand[head])
    # a prediction's pairs by tIoU descending (equal: earlier ground truth), so that its first
    # free pair is the one to take; only predictions with several pairs need sorting
    several = np.flatnonzero(np.bincount(pair_p, minlength=M)[pair_p] > 1)
    if several.size:
        moved = several[np.lexsort((pair_g[several], -tiou[several], pair_p[several]))]
        pair_g[several], tiou[several] = pair_g[moved], tiou[moved]
    # round r matches the r-th candidate of every group (stable: pairs keep the order above)
    s = _stable_argsort(rank[pair_p])
    pair_p, pair_g, tiou = pair_p[s], pair_g[s], tiou[s]
    rounds = np.searchsorted(rank[pair_p], np.arange(rank[pair_p[-1]] + 2))
    locked = np.zeros((T, g_key.size), dtype=bool)
    matched_t, matched_p = [], []
    for a, b in zip(rounds[:-1], rounds[1:]):
        p, g, t = pair_p[a:b], pair_g[a:b], tiou[a:b]
        # the groups of one round are distinct, so their ground truths are too
        free = (t[None, :] >= thresholds[:, None]) & ~locked[:, g]  # (T, m)
        first = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
        if first.size == p.size:
            ti, j = np.nonzero(free)
        else:  # the first free pair of each prediction
            j = np.minimum.reduceat(np.where(free, np.arange(p.size), p.size), first, axis=1)  # (T, predictions)
            ti, k = np.nonzero(j < p.size)
            j = j[ti, k]
        locked[ti, g[j]] = True
        matched_t.append(ti)
        matched_p.append(p[j])
    return np.concatenate(matched_t), by_group[np.concatenate(matched_p)]


def evaluate_detection(gt: GroundTruth, preds: Predictions, thresholds: np.ndarray = ANET_THRESHOLDS) -> dict:
    """mAP of predictions against ground truth:
    `{"mAP": {"0.50": x, ...}, "average_mAP": x, "per_class": {label: {"0.50": ap, ..., "average": ap}},
    "counts": {...}, "labels_without_ground_truth": {label: predictions}}`.

    Predictions whose label has no ground-truth segment in the subset cannot be true positives;
    the mean runs over the classes with ground truth, so they do not enter it (they are listed).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    video, label, known = _codes(gt, preds)
    ap = average_precision(gt.video, gt.label, gt.segment, len(gt.labels), video[known], label[known],
                           preds.segment[known], preds.score[known], thresholds)
    mean_ap = ap.mean(axis=1)
    keys = [threshold_key(t) for t in thresholds]
    unknown = np.bincount(preds.label[~known], minlength=len(preds.labels))
    return {
        "mAP": dict(zip(keys, mean_ap.tolist())),
        "average_mAP": float(mean_ap.mean()),
        "per_class": {name: {**dict(zip(keys, ap[:, c].tolist())), "average": float(ap[:, c].mean())}
                      for c, name in enumerate(gt.labels)},
        "counts": {
            "videos": len(gt.videos),
            "classes": len(gt.labels),
            "ground_truth": int(gt.label.size),
            "predictions": int(preds.score.size),
            "predictions_in_videos_without_ground_truth": int(np.sum(video[known] < 0)),
        },
        "labels_without_ground_truth": {preds.labels[i]: int(unknown[i]) for i in np.flatnonzero(unknown)},
    }


def evaluate(ground_truth: dict, predictions: dict, subset: str | None = "validation",
             thresholds: np.ndarray = ANET_THRESHOLDS) -> dict:
    """`evaluate_detection` on JSON trees: ActivityNet annotations and a submission dict."""
    return evaluate_detection(parse_ground_truth(ground_truth, subset), parse_predictions(predictions), thresholds)


def recall_at_k(gt: GroundTruth, preds: Predictions, k: int = 100, thresholds: np.ndarray = ANET_THRESHOLDS) -> dict:
    """Proposal recall: the k highest-scoring predictions of each video, labels ignored; a
    ground-truth segment is recalled at t if one of them has tIoU >= t with it.
    `{"recall": {"0.50": r, ...}, "AR@k": mean over thresholds}`."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    video, _, _ = _codes(gt, preds)
    order = np.lexsort((-preds.score, video))
    v = video[order]
    first = np.searchsorted(v, v, side="left")
    top = order[(np.arange(v.size) - first < k) & (v >= 0)]

    g_order = np.argsort(gt.video, kind="stable")
    g_video = gt.video[g_order]
    lo = np.searchsorted(g_video, video[top], side="left")
    n = np.searchsorted(g_video, video[top], side="right") - lo
    pair_p = np.repeat(top, n)
    pair_g = g_order[np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(pair_p.size)]
    best = np.zeros(gt.video.size)
    np.maximum.at(best, pair_g, segment_tiou(preds.segment[pair_p], gt.segment[pair_g]))
    recall = (best[None, :] >= thresholds[:, None]).mean(axis=1)
    return {"recall": {threshold_key(t): float(r) for t, r in zip(thresholds, recall)}, f"AR@{k}": float(recall.mean())}


def _codes(gt: GroundTruth, preds: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction video and label codes in the ground truth's numbering (video -1: not in the
    ground truth) and the mask of predictions whose label has ground truth."""
    video_index = {v: i for i, v in enumerate(gt.videos)}
    label_index = {c: i for i, c in enumerate(gt.labels)}
    video_map = np.array([video_index.get(v, -1) for v in preds.videos], dtype=np.int64)
    label_map = np.array([label_index.get(c, -1) for c in preds.labels], dtype=np.int64)
    video = video_map[preds.video] if preds.video.size else preds.video
    label = label_map[preds.label] if preds.label.size else preds.label
    return video, label, label >= 0


def pr_curves(ground_truth: dict, predictions: dict, subset: str | None = "validation",
              thresholds: np.ndarray = np.array([0.5, 0.75, 0.95])) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Precision-recall curves of all predictions pooled over classes, one per tIoU threshold:
    predictions matched as the protocol does (per class), then ranked by score together;
    precision_k = TP_k / k, recall_k = TP_k / ground-truth segments. {"0.50": (recall, precision)}."""
    gt, preds = parse_ground_truth(ground_truth, subset), parse_predictions(predictions)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    video, label, known = _codes(gt, preds)
    video, label = video[known], label[known]
    segment, score = preds.segment[known], preds.score[known]
    tp_t, tp_index = _greedy_match(gt.video, gt.label, gt.segment, len(gt.labels), video, label, segment,
                                   _protocol_order(label, score), thresholds)
    ranked = np.argsort(-score, kind="stable")
    rank = np.empty_like(ranked)
    rank[ranked] = np.arange(ranked.size)
    curves = {}
    for t, key in enumerate(threshold_key(x) for x in thresholds):
        hit = np.zeros(score.size)
        hit[rank[tp_index[tp_t == t]]] = 1.0
        tp = np.cumsum(hit)
        curves[key] = (tp / max(gt.label.size, 1), tp / np.arange(1, score.size + 1))
    return curves
