"""Evaluation: ActivityNet-protocol mAP (hand-computed cases, a slow reference transcription of the
protocol on random problems, the real ActivityNet v1.3 validation annotations), recall, the
`re2tal map` / `re2tal bench map` commands and their errors on bad files."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from re2tal.errors import BadInput
from re2tal.evaluation import (
    ANET_THRESHOLDS,
    THUMOS_THRESHOLDS,
    evaluate_detection,
    evaluate as evaluate_trees,
    parse_ground_truth,
    parse_predictions,
    parse_thresholds,
    recall_at_k,
)

ROOT = Path(__file__).resolve().parents[1]
ANET_VAL = ROOT.parent / "shared" / "data" / "activitynet_v1-3_val_sample_detections.json"


# ------------------------------------------------------------------------------------------
# helpers


def gt_tree(videos: dict[str, list[tuple[float, float, str]]], subset: str = "validation") -> dict:
    return {"version": "VERSION 1.3", "taxonomy": [], "database": {
        vid: {"subset": subset, "duration": 100.0, "url": f"https://example.org/{vid}",
              "annotations": [{"segment": [s, e], "label": c} for s, e, c in segs]}
        for vid, segs in videos.items()}}


def pred_tree(videos: dict[str, list[tuple[float, float, str, float]]]) -> dict:
    return {"version": "VERSION 1.3", "external_data": {}, "results": {
        vid: [{"label": c, "score": p, "segment": [s, e]} for s, e, c, p in preds] for vid, preds in videos.items()}}


def evaluate(gt: dict, preds: dict, thresholds=ANET_THRESHOLDS) -> dict:
    return evaluate_detection(parse_ground_truth(gt), parse_predictions(preds), thresholds)


def reference_ap(gt: dict, preds: dict, thresholds, subset="validation") -> dict[str, np.ndarray]:
    """The protocol written out plainly, one prediction at a time (after the ActivityNet /
    ActionFormer code): per class, sort by score (stable), match each prediction to the unmatched
    ground truth of highest tIoU >= t in its video (stable: first listed wins ties), then the
    VOC all-point interpolated AP."""
    gts = [(vid, a["label"], *a["segment"]) for vid, v in gt["database"].items() if v["subset"] == subset for a in v["annotations"]]
    prs = [(vid, p["label"], *p["segment"], p["score"]) for vid, ps in preds["results"].items() for p in ps]
    out = {}
    for c in sorted({g[1] for g in gts}):
        g_c = [g for g in gts if g[1] == c]
        p_c = sorted([p for p in prs if p[1] == c], key=lambda p: -p[4])
        ap = np.zeros(len(thresholds))
        if not p_c:
            out[c] = ap
            continue
        lock = np.full((len(thresholds), len(g_c)), -1)
        tp = np.zeros((len(thresholds), len(p_c)))
        fp = np.zeros_like(tp)
        for i, p in enumerate(p_c):
            cand = [j for j, g in enumerate(g_c) if g[0] == p[0]]
            if not cand:
                fp[:, i] = 1
                continue
            tious = []
            for j in cand:
                g = g_c[j]
                inter = max(0.0, min(p[3], g[3]) - max(p[2], g[2]))
                union = (g[3] - g[2]) + (p[3] - p[2]) - inter
                tious.append(inter / union if union > 0 else float(p[2] == g[2]))
            tious = np.array(tious)
            for t, thr in enumerate(thresholds):
                for k in np.argsort(-tious, kind="stable"):
                    if tious[k] < thr:
                        fp[t, i] = 1
                        break
                    if lock[t, cand[k]] >= 0:
                        continue
                    tp[t, i] = 1
                    lock[t, cand[k]] = i
                    break
                if tp[t, i] == 0 and fp[t, i] == 0:
                    fp[t, i] = 1
        tp_c, fp_c = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
        rec, prec = tp_c / len(g_c), tp_c / (tp_c + fp_c)
        for t in range(len(thresholds)):
            mprec = np.hstack([[0], prec[t], [0]])
            mrec = np.hstack([[0], rec[t], [1]])
            for i in range(len(mprec) - 1)[::-1]:
                mprec[i] = max(mprec[i], mprec[i + 1])
            idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
            ap[t] = np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx])
        out[c] = ap
    return out


def random_problem(rng, videos=25, classes=4, distinct_scores=False) -> tuple[dict, dict]:
    """Small problems rich in the awkward cases: equal scores, rounded (tied) boundaries,
    duplicate predictions, zero-length segments, videos and labels without ground truth."""
    gt, preds = {}, {}
    for v in range(videos):
        segs = []
        for _ in range(rng.integers(0, 4)):
            s = round(float(rng.uniform(0, 80)), int(rng.integers(0, 2)))
            segs.append((s, s + round(float(rng.choice([0.0, rng.uniform(1, 20)])), 1), f"c{rng.integers(classes)}"))
        gt[f"v{v}"] = segs
    for v in range(videos + 3):
        base = gt.get(f"v{v}", [])
        out = []
        for _ in range(rng.integers(0, 12)):
            if base and rng.random() < 0.7:
                s, e, c = base[rng.integers(len(base))]
                s, e = sorted((s + rng.normal(0, 2), e + rng.normal(0, 2)))
                c = c if rng.random() < 0.8 else f"c{rng.integers(classes + 1)}"
            else:
                s = rng.uniform(0, 80)
                e, c = s + rng.uniform(0, 20), f"c{rng.integers(classes + 1)}"
            score = float(rng.random()) if distinct_scores else float(rng.choice([0.5, 0.9, rng.random()]))
            out.append((round(s, 1), round(e, 1), c, score))
            if rng.random() < 0.1:
                out.append(out[-1])  # a duplicate
        preds[f"v{v}"] = out
    return gt_tree(gt), pred_tree(preds)


# ------------------------------------------------------------------------------------------
# hand-computed cases


def test_ap_by_hand_true_false_true():
    # p1 -> g1 (tIoU 0.8), p2 overlaps nothing enough, p3 -> g2: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    gt = gt_tree({"a": [(0, 10, "x"), (20, 30, "x")]})
    preds = pred_tree({"a": [(0, 8, "x", 0.9), (40, 50, "x", 0.8), (20, 30, "x", 0.7)]})
    r = evaluate(gt, preds, [0.5])
    assert r["mAP"] == {"0.50": pytest.approx(0.5 * 1 + 0.5 * 2 / 3)}
    assert r["per_class"]["x"]["0.50"] == pytest.approx(5 / 6)


def test_tiou_threshold_decides_true_positive():
    gt = gt_tree({"a": [(0, 10, "x")]})
    preds = pred_tree({"a": [(0, 6, "x", 0.9)]})  # tIoU 0.6
    r = evaluate(gt, preds, ANET_THRESHOLDS)
    assert [r["mAP"][k] for k in ("0.50", "0.55", "0.60", "0.65", "0.95")] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert r["average_mAP"] == pytest.approx(0.3)


def test_equal_tiou_goes_to_the_first_listed_ground_truth():
    # p1 has tIoU 1/3 with both; it takes g1 (listed first), so p2, which only fits g1, is a false positive
    gt = gt_tree({"a": [(0, 10, "x"), (10, 20, "x")]})
    preds = pred_tree({"a": [(5, 15, "x", 0.9), (0, 12, "x", 0.8)]})
    assert evaluate(gt, preds, [0.3])["mAP"]["0.30"] == pytest.approx(0.5)
    # listed the other way round, p1 takes (0, 10)... which is now second: same rule, other outcome
    gt_swapped = gt_tree({"a": [(10, 20, "x"), (0, 10, "x")]})
    assert evaluate(gt_swapped, preds, [0.3])["mAP"]["0.30"] == pytest.approx(1.0)


def test_duplicate_prediction_is_a_false_positive():
    gt = gt_tree({"a": [(0, 10, "x"), (20, 30, "x")]})
    preds = pred_tree({"a": [(0, 10, "x", 0.9), (0, 10, "x", 0.8), (20, 30, "x", 0.7)]})
    assert evaluate(gt, preds, [0.5])["mAP"]["0.50"] == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_prediction_in_video_without_ground_truth_is_a_false_positive():
    gt = gt_tree({"a": [(0, 10, "x")]})
    preds = pred_tree({"a": [(0, 10, "x", 0.5)], "not-in-gt": [(0, 10, "x", 0.9)]})
    r = evaluate(gt, preds, [0.5])
    assert r["mAP"]["0.50"] == pytest.approx(0.5)  # precision 1/2 at recall 1
    assert r["counts"]["predictions_in_videos_without_ground_truth"] == 1


def test_video_of_another_subset_counts_as_without_ground_truth():
    gt = gt_tree({"a": [(0, 10, "x")]})
    gt["database"]["t"] = {"subset": "training", "annotations": [{"segment": [0, 10], "label": "x"}]}
    preds = pred_tree({"a": [(0, 10, "x", 0.5)], "t": [(0, 10, "x", 0.9)]})
    assert evaluate(gt, preds, [0.5])["mAP"]["0.50"] == pytest.approx(0.5)


def test_class_without_predictions_has_ap_zero_and_unknown_labels_are_listed():
    gt = gt_tree({"a": [(0, 10, "x"), (20, 30, "y")]})
    preds = pred_tree({"a": [(0, 10, "x", 0.9), (20, 30, "never-annotated", 0.95)]})
    r = evaluate(gt, preds, [0.5])
    assert r["per_class"]["x"]["0.50"] == 1.0 and r["per_class"]["y"]["0.50"] == 0.0
    assert r["mAP"]["0.50"] == pytest.approx(0.5)
    assert r["labels_without_ground_truth"] == {"never-annotated": 1}
    assert set(r["per_class"]) == {"x", "y"}


def test_zero_length_segments_match_only_the_same_point():
    gt = gt_tree({"a": [(5, 5, "x"), (7, 7, "x")]})
    preds = pred_tree({"a": [(5, 5, "x", 0.9), (8, 8, "x", 0.8)]})
    assert evaluate(gt, preds, [0.5])["mAP"]["0.50"] == pytest.approx(0.5)


def test_evaluate_json_trees_of_one_subset():
    gt = gt_tree({"a": [(0, 10, "x")]})
    gt["database"]["b"] = {"subset": "testing", "annotations": [{"segment": [0, 10], "label": "y"}]}
    preds = pred_tree({"a": [(0, 10, "x", 0.9)], "b": [(0, 10, "y", 0.9)]})
    assert evaluate_trees(gt, preds, "validation", [0.5])["mAP"] == {"0.50": 1.0}
    assert evaluate_trees(gt, preds, "testing", [0.5])["per_class"] == {"y": {"0.50": 1.0, "average": 1.0}}
    assert evaluate_trees(gt, preds, None, [0.5])["counts"]["classes"] == 2


def test_no_predictions_at_all_gives_zero():
    r = evaluate(gt_tree({"a": [(0, 10, "x")]}), pred_tree({}), [0.5, 0.7])
    assert r["mAP"] == {"0.50": 0.0, "0.70": 0.0} and r["average_mAP"] == 0.0


# ------------------------------------------------------------------------------------------
# against the reference, invariances


@pytest.mark.parametrize("seed", range(6))
def test_fast_evaluation_equals_slow_reference_exactly(seed):
    rng = np.random.default_rng(seed)
    for _ in range(10):
        gt, preds = random_problem(rng)
        thresholds = ANET_THRESHOLDS if rng.random() < 0.5 else THUMOS_THRESHOLDS
        ref = reference_ap(gt, preds, thresholds)
        fast = evaluate(gt, preds, thresholds)
        assert set(fast["per_class"]) == set(ref)
        for c, ap in ref.items():
            got = np.array([fast["per_class"][c][f"{t:.2f}"] for t in thresholds])
            np.testing.assert_array_equal(got, ap)  # bit-identical, not just close
        assert fast["average_mAP"] == pytest.approx(np.mean(np.stack(list(ref.values()))), abs=1e-14)


def test_many_predictions_per_group_and_many_rounds_equal_reference():
    # one video, one class, many ground truths and 150 overlapping predictions: 150 matching rounds
    rng = np.random.default_rng(7)
    gts = [(float(s), float(s) + 8, "x") for s in range(0, 200, 10)]
    preds = [(float(s), float(s) + float(rng.uniform(4, 12)), "x", float(rng.random())) for s in rng.uniform(0, 200, 150)]
    gt, pr = gt_tree({"v": gts}), pred_tree({"v": preds})
    ref = reference_ap(gt, pr, ANET_THRESHOLDS)["x"]
    np.testing.assert_array_equal([evaluate(gt, pr)["per_class"]["x"][f"{t:.2f}"] for t in ANET_THRESHOLDS], ref)


def test_prediction_order_does_not_matter_for_distinct_scores():
    rng = np.random.default_rng(3)
    gt, preds = random_problem(rng, videos=40, distinct_scores=True)
    base = evaluate(gt, preds)
    items = [(vid, p) for vid, ps in preds["results"].items() for p in ps]
    for _ in range(3):
        shuffled: dict = {}
        for i in rng.permutation(len(items)):
            vid, p = items[i]
            shuffled.setdefault(vid, []).append(p)
        assert evaluate(gt, {"results": shuffled}) == base


# ------------------------------------------------------------------------------------------
# real annotations: ActivityNet v1.3 validation


@pytest.fixture(scope="module")
def anet_val():
    if not ANET_VAL.exists():
        pytest.skip(f"real annotations not present at {ANET_VAL} (shared data folder beside the repository)")
    sample = json.loads(ANET_VAL.read_text())
    database = {vid: {"subset": "validation", "annotations": [{"segment": p["segment"], "label": p["label"]} for p in ps]}
                for vid, ps in sample["results"].items()}
    return {"database": database}, sample


def shifted(sample: dict, fraction: float) -> dict:
    """Every segment moved right by `fraction` of its length: tIoU (1 - f) / (1 + f) with its original."""
    return {"results": {vid: [{**p, "segment": [p["segment"][0] + fraction * (p["segment"][1] - p["segment"][0]),
                                                p["segment"][1] + fraction * (p["segment"][1] - p["segment"][0])]}
                              for p in ps] for vid, ps in sample["results"].items()}}


def test_real_annotations_perfect_predictions_give_map_one(anet_val):
    gt, sample = anet_val
    r = evaluate(gt, sample)
    assert r["counts"]["videos"] == 4926 and r["counts"]["classes"] == 200 and r["counts"]["ground_truth"] == 7654
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in r["mAP"].values())
    assert r["average_mAP"] == pytest.approx(1.0, abs=1e-12)


def test_real_annotations_shifted_predictions_lose_map_in_known_order(anet_val):
    gt, sample = anet_val
    averages = []
    for fraction in (0.05, 0.1, 0.2, 0.3, 0.4):
        r = evaluate(gt, shifted(sample, fraction))
        cut = (1 - fraction) / (1 + fraction)  # tIoU of every non-empty segment with its original
        for key, value in r["mAP"].items():
            # zero-length segments stay on their point, so a few classes keep some AP above the cut
            assert value > 0.99 if float(key) <= cut else value < 0.01, (fraction, key, value)
        averages.append(r["average_mAP"])
    # cuts 0.905, 0.818, 0.667, 0.538, 0.429 keep 9, 7, 4, 1, 0 of the 10 thresholds
    assert averages == pytest.approx([0.9, 0.7, 0.4, 0.1, 0.0], abs=0.005)
    assert averages == sorted(averages, reverse=True)


def test_real_annotations_fast_equals_reference_on_a_slice(anet_val):
    gt, sample = anet_val
    vids = sorted(gt["database"])[:300]
    gt_small = {"database": {v: {"subset": "validation", **gt["database"][v]} for v in vids}}
    rng = np.random.default_rng(0)
    preds = shifted({"results": {v: sample["results"][v] for v in vids}}, 0.15)
    for ps in preds["results"].values():
        for p in ps:
            p["score"] = float(rng.random())
    ref = reference_ap(gt_small, preds, ANET_THRESHOLDS)
    fast = evaluate(gt_small, preds)
    for c, ap in ref.items():
        np.testing.assert_array_equal([fast["per_class"][c][f"{t:.2f}"] for t in ANET_THRESHOLDS], ap)


# ------------------------------------------------------------------------------------------
# recall, thresholds


def test_recall_at_k_counts_top_k_per_video_without_labels():
    gt = parse_ground_truth(gt_tree({"a": [(0, 10, "x"), (20, 30, "y")], "b": [(0, 10, "x")]}))
    preds = parse_predictions(pred_tree({
        "a": [(0, 10, "y", 0.9), (21, 30, "x", 0.5), (50, 60, "x", 0.7)],  # labels are ignored
        "b": [(0, 6, "x", 0.9)],  # tIoU 0.6
    }))
    r1 = recall_at_k(gt, preds, k=1, thresholds=np.array([0.5, 0.7]))
    assert r1["recall"] == {"0.50": pytest.approx(2 / 3), "0.70": pytest.approx(1 / 3)}
    r3 = recall_at_k(gt, preds, k=3, thresholds=np.array([0.5, 0.7]))
    assert r3["recall"] == {"0.50": 1.0, "0.70": pytest.approx(2 / 3)} and r3["AR@3"] == pytest.approx(5 / 6)


def test_threshold_parsing():
    np.testing.assert_array_equal(parse_thresholds("0.5:0.95:0.05"), np.linspace(0.5, 0.95, 10))
    np.testing.assert_array_equal(parse_thresholds("0.3:0.7:0.1"), np.linspace(0.3, 0.7, 5))
    np.testing.assert_array_equal(parse_thresholds("0.7, 0.5"), [0.5, 0.7])
    for bad in ("0.5:0.95", "abc", "0.5:0.95:0", "1.5", ""):
        with pytest.raises(BadInput, match="--tiou"):
            parse_thresholds(bad)


# ------------------------------------------------------------------------------------------
# bad input


BAD_PREDICTIONS = [
    ({"version": "1"}, "missing key 'results'"),
    ({"results": []}, "'results' must be an object"),
    ({"results": {"v1": {"label": "x"}}}, "video 'v1': expected a list"),
    ({"results": {"v1": [{"label": "x", "segment": [0, 1]}]}}, "video 'v1' result 0: missing key 'score'"),
    ({"results": {"v1": [{"label": "x", "score": 0.5, "segment": [0, 1]}], "v2": [{"label": "x", "score": 0.5, "segment": [3, 1]}]}},
     "video 'v2' result 0: segment end 1.0 < start 3.0"),
    ({"results": {"v1": [{"label": "x", "score": float("nan"), "segment": [0, 1]}]}}, "video 'v1' result 0: score must be a finite number"),
    ({"results": {"v1": [{"label": "x", "score": "high", "segment": [0, 1]}]}}, "video 'v1' result 0: score must be a finite number"),
    ({"results": {"v1": [{"label": "x", "score": 0.5, "segment": [0, 1, 2]}]}}, "video 'v1' result 0: segment must be \\[start, end\\]"),
    ({"results": {"v1": [{"label": "x", "score": 0.5, "segment": [0, 1]}, {"label": "x", "score": 0.5, "segment": [0]}]}},
     "video 'v1' result 1: segment must be \\[start, end\\]"),
    ({"results": {"v1": [{"label": 3, "score": 0.5, "segment": [0, 1]}]}}, "video 'v1' result 0: label must be a string"),
    ({"results": {"v0": [], "v1": [{"label": "x", "score": 0.5, "segment": [0, float("inf")]}]}}, "video 'v1' result 0: segment must be finite"),
]


@pytest.mark.parametrize("tree,message", BAD_PREDICTIONS, ids=[m[:30] for _, m in BAD_PREDICTIONS])
def test_bad_predictions_name_video_and_field(tree, message):
    with pytest.raises(BadInput, match=message):
        parse_predictions(tree, source="pred.json")


BAD_GROUND_TRUTH = [
    ({"videos": {}}, "missing key 'database'"),
    ({"database": {"v1": {"annotations": []}}}, "video 'v1': missing key 'subset'"),
    ({"database": {"v1": {"subset": "validation"}}}, "video 'v1': missing key 'annotations'"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"segment": [5, 2], "label": "x"}]}}},
     "video 'v1' annotations\\[0\\]: segment end 2.0 < start 5.0"),
    ({"database": {"v1": {"subset": "validation", "annotations": [{"segment": [0, 2]}]}}}, "video 'v1' annotations\\[0\\]: missing key 'label'"),
    ({"database": {"v1": {"subset": "training", "annotations": []}}}, "no videos in subset 'validation' \\(subsets present: training\\)"),
    ({"database": {"v1": {"subset": "validation", "annotations": []}}}, "have no annotated segments"),
]


@pytest.mark.parametrize("tree,message", BAD_GROUND_TRUTH, ids=[m[:30] for _, m in BAD_GROUND_TRUTH])
def test_bad_ground_truth_names_video_and_field(tree, message):
    with pytest.raises(BadInput, match=message):
        parse_ground_truth(tree, "validation", source="gt.json")


# ------------------------------------------------------------------------------------------
# the commands


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "re2tal.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_map_command_json_and_table(tmp_path):
    gt = gt_tree({"a": [(0, 10, "x"), (20, 30, "x")], "b": [(0, 10, "y")]})
    preds = pred_tree({"a": [(0, 8, "x", 0.9), (40, 50, "x", 0.8), (20, 30, "x", 0.7)], "b": [(0, 10, "y", 0.6)]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    args = ["map", "--ground-truth", str(tmp_path / "gt.json"), "--predictions", str(tmp_path / "pred.json")]
    out = run_cli(*args, "--json", "--tiou", "0.3:0.7:0.1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert list(result["mAP"]) == ["0.30", "0.40", "0.50", "0.60", "0.70"]
    assert result["mAP"]["0.50"] == pytest.approx((5 / 6 + 1) / 2)
    assert result["per_class"]["y"]["average"] == 1.0
    assert result["average_mAP"] == pytest.approx(np.mean(list(result["mAP"].values())))
    table = run_cli(*args)
    assert table.returncode == 0 and "0.95" in table.stdout and "avg" in table.stdout


@pytest.mark.parametrize("content,message", [
    ("{not json", "pred.json: not valid JSON \\(line 1 column 2"),
    (json.dumps({"results": {"vid-7": [{"label": "x", "score": 0.5, "segment": [9, 1]}]}}), "pred.json: video 'vid-7' result 0: segment end"),
    (json.dumps({"results": {"vid-7": [{"label": "x", "score": "NaN", "segment": [0, 1]}]}}), "video 'vid-7' result 0: score"),
    (json.dumps({"version": 1}), "pred.json: missing key 'results'"),
])
def test_map_command_bad_files_exit_2_with_one_line(tmp_path, content, message):
    (tmp_path / "gt.json").write_text(json.dumps(gt_tree({"a": [(0, 10, "x")]})))
    (tmp_path / "pred.json").write_text(content)
    out = run_cli("map", "--ground-truth", str(tmp_path / "gt.json"), "--predictions", str(tmp_path / "pred.json"))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert re.search(message, out.stderr), out.stderr


def test_map_command_missing_file_exit_2(tmp_path):
    out = run_cli("map", "--ground-truth", str(tmp_path / "nope.json"), "--predictions", str(tmp_path / "nope.json"))
    assert out.returncode == 2 and "nope.json: no such file" in out.stderr


def test_bench_map_writes_json(tmp_path):
    out = run_cli("bench", "map", "--videos", "200", "--json", str(tmp_path / "map.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "map.json").read_text())
    assert result["predictions"] == 200 * 100 and result["thresholds"] == 10
    assert result["compute_s"] > 0 and result["parse_s"] > 0 and result["json_load_s"] > 0
    assert 0 < result["average_mAP"] < 1
