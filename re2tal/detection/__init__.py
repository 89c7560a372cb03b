"""re2tal.detection: ActionFormer-style neck and heads, label assignment and losses, Soft-NMS.

    model = build_detector(cfg.head, in_channels)        # modules only
    out = model(feats_BCTHW, valid_B)                     # DetectorOutput
    losses = DetectionLoss(cfg.head)(out, gt_segments, gt_labels)   # grid units (seconds_to_grid)
    clips = postprocess(out, cfg.head.nms)                # per clip: candidates, grid units
    submission = to_predictions(clips, videos, windows, durations, label_names, cfg.head.nms, cfg.head.seq_len,
                                sliding=cfg.data.sampling == "sliding")   # one Soft-NMS per video
"""

from re2tal.detection.grid import grid_to_seconds, seconds_to_grid, targets_in_window
from re2tal.detection.loss import DetectionLoss, assign_targets, iou_loss_1d
from re2tal.detection.model import Detector, DetectorOutput, build_detector
from re2tal.detection.postprocess import (
    batched_nms,
    load_class_scores,
    parse_class_scores,
    postprocess,
    segment_voting,
    soft_nms,
    to_predictions,
)

__all__ = [
    "DetectionLoss",
    "Detector",
    "DetectorOutput",
    "assign_targets",
    "batched_nms",
    "build_detector",
    "grid_to_seconds",
    "iou_loss_1d",
    "load_class_scores",
    "parse_class_scores",
    "postprocess",
    "seconds_to_grid",
    "segment_voting",
    "soft_nms",
    "targets_in_window",
    "to_predictions",
]
