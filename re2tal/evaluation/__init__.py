"""re2tal.evaluation: ActivityNet-protocol detection mAP and proposal recall (numpy only).

    gt = parse_ground_truth(tree, subset="validation")
    preds = parse_predictions(submission)
    evaluate_detection(gt, preds, ANET_THRESHOLDS)  # {"mAP": {"0.50": ...}, "average_mAP": ...}
    evaluate(annotations_tree, submission_tree, "validation")  # the same from JSON trees
"""

from re2tal.evaluation.formats import GroundTruth, Predictions, parse_ground_truth, parse_predictions
from re2tal.evaluation.metrics import (
    ANET_THRESHOLDS,
    THUMOS_THRESHOLDS,
    average_precision,
    evaluate,
    evaluate_detection,
    parse_thresholds,
    pr_curves,
    recall_at_k,
    segment_tiou,
    threshold_key,
)

__all__ = [
    "ANET_THRESHOLDS",
    "THUMOS_THRESHOLDS",
    "GroundTruth",
    "Predictions",
    "average_precision",
    "evaluate",
    "evaluate_detection",
    "parse_ground_truth",
    "parse_predictions",
    "parse_thresholds",
    "pr_curves",
    "recall_at_k",
    "segment_tiou",
    "threshold_key",
]
