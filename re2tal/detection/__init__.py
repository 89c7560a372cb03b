"""re2tal.detection: ActionFormer-style neck and heads, label assignment and losses, Soft-NMS.

    model = build_detector(cfg.head, in_channels)        # modules only
    out = model(feats_BCTHW, valid_B)                     # DetectorOutput
    losses = DetectionLoss(cfg.head)(out, gt_segments, gt_labels)   # grid units (seconds_to_grid)
    clips = postprocess(out, cfg.head.nms)                # per clip, grid units
    submission = to_predictions(clips, videos, windows, durations, label_names, cfg.head.nms, cfg.head.seq_len)
"""

from re2tal.detection.grid import grid_to_seconds, seconds_to_grid, targets_in_window
from re2tal.detection.loss import DetectionLoss, assign_targets, iou_loss_1d
from re2tal.detection.model import Detector, DetectorOutput, build_detector
from re2tal.detection.postprocess import (
    decode,
    load_class_scores,
    parse_class_scores,
    postprocess,
    soft_nms,
    to_predictions,
)

__all__ = [
    "DetectionLoss",
    "Detector",
    "DetectorOutput",
    "assign_targets",
    "build_detector",
    "decode",
    "grid_to_seconds",
    "iou_loss_1d",
    "load_class_scores",
    "parse_class_scores",
    "postprocess",
    "seconds_to_grid",
    "soft_nms",
    "targets_in_window",
    "to_predictions",
]
