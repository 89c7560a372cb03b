"""Label assignment and losses of the detector (ActionFormer / FCOS style), separate from the model.

Assignment, per point at grid position x on a level of stride s, for ground-truth segments
[a, b] (grid units):
  - centre sampling: x must lie strictly inside [max(a, c - r s), min(b, c + r s)], c = (a + b) / 2,
    r = center_sample_radius;
  - regression range: max(x - a, b - x) must lie in the level's [low, high];
  - among the segments left the shortest wins (the easiest to regress); segments within 1e-3 of
    that length all set their class (multi-label).
The point's regression target is (x - a, b - x) / s for the winner.

Losses: sigmoid focal loss over the classes of every real point, 1-D DIoU / GIoU loss over the
positive points, each summed and divided by an exponential moving average of the number of
positives, kept as a buffer so it is checkpointed with the module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from re2tal.config import HeadConfig
from re2tal.detection.model import DetectorOutput


@torch.no_grad()
def assign_targets(points: torch.Tensor, strides: torch.Tensor, ranges: torch.Tensor, gt_segments: list[torch.Tensor],
                   gt_labels: list[torch.Tensor], num_classes: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of every point of every clip.

    points, strides (P,): grid position and stride of each point; ranges (P, 2): regression
    range of its level; gt_segments[b] (N_b, 2) grid units, gt_labels[b] (N_b,) class ids.
    Returns cls_targets (B, P, K) in {0, 1} and reg_targets (B, P, 2) in strides.
    """
    B, P = len(gt_segments), points.numel()
    N = max((len(s) for s in gt_segments), default=0)
    cls_t = points.new_zeros(B, P, num_classes)
    reg_t = points.new_zeros(B, P, 2)
    if N == 0:
        return cls_t, reg_t
    seg = points.new_zeros(B, N, 2)
    lab = torch.zeros(B, N, dtype=torch.long, device=points.device)
    real = torch.zeros(B, N, dtype=torch.bool, device=points.device)
    for i, (segments, labels) in enumerate(zip(gt_segments, gt_labels)):
        n = len(segments)
        seg[i, :n], lab[i, :n], real[i, :n] = segments.to(seg), labels.to(lab.device), True

    x, s = points[None, :, None], strides[None, :, None]  # (1, P, 1)
    a, b = seg[:, None, :, 0], seg[:, None, :, 1]  # (B, 1, N)
    left, right = x - a, b - x  # (B, P, N)
    c = 0.5 * (a + b)
    inside = torch.minimum(x - torch.maximum(c - radius * s, a), torch.minimum(c + radius * s, b) - x) > 0
    reach = torch.maximum(left, right)
    in_range = (reach >= ranges[None, :, None, 0]) & (reach <= ranges[None, :, None, 1])
    length = (b - a).expand(B, P, N).masked_fill(~(inside & in_range & real[:, None, :]), float("inf"))
    shortest, winner = length.min(dim=2)  # (B, P)
    chosen = (length <= shortest[..., None] + 1e-3) & torch.isfinite(length)  # (B, P, N)
    cls_t = (chosen.to(seg.dtype) @ F.one_hot(lab, num_classes).to(seg.dtype)).clamp_(max=1.0)
    reg_t = torch.stack([left, right], dim=-1).gather(2, winner[..., None, None].expand(B, P, 1, 2))[:, :, 0]
    return cls_t, reg_t / strides[None, :, None]


def iou_loss_1d(pred: torch.Tensor, target: torch.Tensor, kind: str = "diou", eps: float = 1e-8) -> torch.Tensor:
    """1-D IoU loss of distance pairs (N, 2) = (to start, to end), both from the same point.

    IoU = I / U with I = min(l, l*) + min(r, r*), U = l + r + l* + r* - I; C = max(l, l*) + max(r, r*)
    is the enclosing length. GIoU: 1 - IoU + (C - U) / C. DIoU: 1 - IoU + rho^2 / C^2, rho the
    distance of the centres, ((r - l) - (r* - l*)) / 2. Returns (N,).
    """
    l, r = pred.unbind(-1)
    lt, rt = target.unbind(-1)
    inter = torch.minimum(l, lt) + torch.minimum(r, rt)
    union = l + r + lt + rt - inter
    iou = inter / union.clamp(min=eps)
    enclose = torch.maximum(l, lt) + torch.maximum(r, rt)
    if kind == "giou":
        return 1.0 - iou + (enclose - union) / enclose.clamp(min=eps)
    rho = 0.5 * ((r - l) - (rt - lt))
    return 1.0 - iou + rho.square() / enclose.square().clamp(min=eps)


class DetectionLoss(nn.Module):
    """loss = focal(cls) / norm + reg_loss_weight * iou_loss(reg) / norm, norm = EMA of positives.

    The normaliser is a buffer (it is saved with the state dict) and is updated only in
    training mode; call `.eval()` for validation losses.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("loss_norm", torch.tensor(float(cfg.init_loss_norm)))
        self.frame_weight = cfg.frame_loss_weight

    def set_epoch(self, epoch: int) -> None:
        """The frame loss is applied in the first `frame_loss_epochs` epochs (0-based `epoch`).
        After that its weight is 0 but it is still computed, so every parameter keeps a gradient
        (DeepSpeed reduces gradients of all parameters)."""
        limit = self.cfg.frame_loss_epochs
        self.frame_weight = self.cfg.frame_loss_weight if limit is None or epoch < limit else 0.0

    def forward(self, out: DetectorOutput, gt_segments: list[torch.Tensor], gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """out: the detector's output; gt_segments[b] (N_b, 2) grid units (`seconds_to_grid`),
        gt_labels[b] (N_b,) class ids. Returns 0-dim fp32 `loss`, `cls_loss`, `reg_loss`."""
        # fp32 throughout, also when the model ran under autocast
        with torch.autocast(out.cls_logits[0].device.type, enabled=False):
            return self._losses(out, gt_segments, gt_labels)

    def _losses(self, out: DetectorOutput, gt_segments: list[torch.Tensor], gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        logits, offsets, valid, points, strides = out.flat()
        logits, offsets = logits.float(), offsets.float()
        ranges = torch.tensor(cfg.regression_ranges, dtype=torch.float32, device=points.device)
        level_ranges = torch.cat([ranges[i].expand(len(p), 2) for i, p in enumerate(out.points)])
        cls_t, reg_t = assign_targets(points, strides, level_ranges, gt_segments, gt_labels, cfg.num_classes,
                                      cfg.center_sample_radius)
        pos = (cls_t.sum(-1) > 0) & valid
        num_pos = pos.sum()
        if self.training:
            with torch.no_grad():
                m = cfg.loss_norm_momentum
                self.loss_norm.copy_(m * self.loss_norm.float() + (1 - m) * num_pos.clamp(min=1).float())
        norm = self.loss_norm.float()

        target = cls_t[valid]
        if cfg.label_smoothing > 0:
            target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / (cfg.num_classes + 1)
        cls_loss = sigmoid_focal_loss(logits[valid], target, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="sum") / norm
        # sum over zero positives is 0 and keeps the graph connected
        reg_loss = iou_loss_1d(offsets[pos], reg_t[pos], cfg.reg_loss).sum() / norm
        losses = {"loss": cls_loss + cfg.reg_loss_weight * reg_loss, "cls_loss": cls_loss, "reg_loss": reg_loss}
        if out.frame_logits is not None:
            labels = frame_labels(out.seq_len, gt_segments, gt_labels, out.frame_logits.device)
            frame_valid = out.masks[0]
            losses["frame_loss"] = F.cross_entropy(out.frame_logits.float()[frame_valid], labels[frame_valid])
            losses["loss"] = losses["loss"] + self.frame_weight * losses["frame_loss"]
        return losses


def frame_labels(seq_len: int, gt_segments: list[torch.Tensor], gt_labels: list[torch.Tensor], device) -> torch.Tensor:
    """(B, seq_len) class id + 1 of the segment covering each grid cell's centre, 0 for background
    (the later segment where two overlap)."""
    centres = torch.arange(seq_len, device=device, dtype=torch.float32) + 0.5
    out = torch.zeros(len(gt_segments), seq_len, dtype=torch.long, device=device)
    for b, (segments, labels) in enumerate(zip(gt_segments, gt_labels)):
        for (a, e), c in zip(segments.to(device).float().tolist(), labels.tolist()):
            out[b, (centres >= a) & (centres < e)] = int(c) + 1
    return out
