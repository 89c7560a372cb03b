"""Clip augmentations, applied on the worker's device to a collated uint8 batch.

Training: one random draw per clip, applied identically to all its frames — random resized crop,
horizontal flip, RandAugment (mmaction's ImgAug default, as OpenTAD's configs), colour jitter,
rotation (each an `augment` toggle), in that order. Evaluation: center crop (the decoder has
already resized the short side to `data.short_side`; with `augment.eval_resize` resized to the
crop size first). Temporal jitter, the fifth
augmentation of Re²TAL's ablation, chooses which frames are decoded, so the frame sampler applies
it, not this module.

The ops are torchvision.transforms.v2's functional ones, which treat (N, C, H, W) as a video,
except hue (see `_adjust_hue`). The random parameters are drawn here from the caller's generator
rather than by the v2 transform classes, which draw from the global RNG: results then depend only
on the generator, and other code (loader threads) sharing the global RNG neither disturbs nor is
disturbed by augmentation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from re2tal.config import AugmentConfig


def augment_clips(frames_BNHW3: torch.Tensor, cfg: AugmentConfig, out_size: int, mean: Sequence[float], std: Sequence[float],
                  generator: torch.Generator, training: bool) -> torch.Tensor:
    """uint8 clips (B, N, H, W, 3) -> normalised float32 clips (B, 3, N, out_size, out_size).

    x_out = (aug(x / 255) - mean) / std per channel, with mean / std on the 0-1 scale. In training
    `aug` is drawn once per clip from `generator` (on any device); in evaluation it is a center
    crop. Frames must be at least out_size on their short side in evaluation (smaller ones are
    resized up)."""
    if frames_BNHW3.dtype != torch.uint8 or frames_BNHW3.ndim != 5 or frames_BNHW3.shape[-1] != 3:
        raise ValueError(f"expected uint8 clips (B, N, H, W, 3), got {frames_BNHW3.dtype} {tuple(frames_BNHW3.shape)}")
    clips_BN3HW = frames_BNHW3.permute(0, 1, 4, 2, 3)
    b, n = frames_BNHW3.shape[:2]
    device = frames_BNHW3.device
    # x_out = x * scale + shift with x on the 0-1 scale: one pass instead of sub + div
    scale_3 = 1 / torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    shift_3 = -torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1) * scale_3
    out_B3NSS = torch.empty((b, 3, n, out_size, out_size), dtype=torch.float32, device=device)
    for clip_N3HW, dst_3NSS in zip(clips_BN3HW, out_B3NSS):
        dst_N3SS = dst_3NSS.transpose(0, 1)  # written in the output layout, no stack / permute copies
        if training:
            _train_clip(clip_N3HW, cfg, out_size, scale_3, shift_3, generator, dst_N3SS)
        else:
            torch.addcmul(shift_3, _center_crop(clip_N3HW, out_size, cfg.eval_resize), scale_3 / 255, out=dst_N3SS)
    return out_B3NSS


def _center_crop(clip_N3HW: torch.Tensor, size: int, resize: bool = False) -> torch.Tensor:
    if resize or min(clip_N3HW.shape[-2:]) < size:  # never pad: scale the short side up to the crop
        clip_N3HW = F.resize(clip_N3HW, [size], antialias=True)
    return F.center_crop(clip_N3HW, [size, size])


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _train_clip(clip_N3HW: torch.Tensor, cfg: AugmentConfig, size: int, scale_3: torch.Tensor, shift_3: torch.Tensor,
                g: torch.Generator, out_N3SS: torch.Tensor) -> None:
    """One uint8 clip (N, 3, H, W) -> augmented, normalised float clip written to out (N, 3, size, size)."""
    if cfg.random_resized_crop:
        top, left, h, w = _crop_params(*clip_N3HW.shape[-2:], cfg.crop_scale, cfg.crop_ratio, g)
        # on uint8: torch's antialiased uint8 resize is 3-6x faster than the float one on CPU
        x = F.resized_crop(clip_N3HW, top, left, h, w, [size, size], antialias=True)
    else:
        x = _center_crop(clip_N3HW, size)
    if cfg.hflip and _uniform(g, 0, 1) < 0.5:
        x = F.horizontal_flip(x)
    if cfg.rand_augment:
        x = _rand_augment(x, cfg.rand_augment_ops, cfg.rand_augment_magnitude, g)
    max_value = 255
    if cfg.color_jitter:
        x, max_value = _color_jitter(x.float().div_(255), cfg, g), 1
    if not (cfg.rotation and cfg.rotation_degrees > 0):
        torch.addcmul(shift_3, x, scale_3 / max_value, out=out_N3SS)
        return
    # Rotated after normalisation, where the corners' zero fill is the mean colour: this spares
    # torchvision the masked blend it does for a non-zero fill (1.5x faster, same result).
    angle = _uniform(g, -cfg.rotation_degrees, cfg.rotation_degrees)
    out_N3SS.copy_(F.rotate(torch.addcmul(shift_3, x, scale_3 / max_value), angle, interpolation=InterpolationMode.BILINEAR))


def _rand_augment(x: torch.Tensor, ops: int, level: float, g: torch.Generator) -> torch.Tensor:
    """mmaction's ImgAug default (RandAugment, imgaug SomeOf(n=ops) in list order) on a uint8 clip
    (N, 3, H, W), at `level` of each op's maximum: shear 17.19 deg, translate 0.2 of the side,
    rotate 30 deg, posterize to 4 * level bits, solarize above 256 * level, colour / contrast /
    brightness / sharpness factor 1.8 * level + 0.1, autocontrast, equalize, invert, a square
    cutout 0.2 * level of the short side filled with 128 (geometric ops fill with black, as
    imgaug's). Signs are drawn per clip (mmaction draws them once, when the pipeline is built)."""
    h, w = x.shape[-2:]
    factor = 1.8 * level + 0.1

    def sign() -> float:
        return 1.0 if _uniform(g, 0, 1) < 0.5 else -1.0

    def cutout(x: torch.Tensor) -> torch.Tensor:
        side = max(1, round(0.2 * level * min(h, w)))
        cy, cx = int(_uniform(g, 0, 1) * h), int(_uniform(g, 0, 1) * w)
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        return F.erase(x, top, left, min(side, h - top), min(side, w - left), torch.tensor(128, dtype=x.dtype))

    table = [
        lambda x: F.affine(x, 0.0, [0, 0], 1.0, [17.19 * level * sign(), 0.0], interpolation=InterpolationMode.BILINEAR),
        lambda x: F.affine(x, 0.0, [0, 0], 1.0, [0.0, 17.19 * level * sign()], interpolation=InterpolationMode.BILINEAR),
        lambda x: F.affine(x, 0.0, [round(0.2 * level * w * sign()), 0], 1.0, [0.0, 0.0]),
        lambda x: F.affine(x, 0.0, [0, round(0.2 * level * h * sign())], 1.0, [0.0, 0.0]),
        lambda x: F.rotate(x, 30 * level * sign(), interpolation=InterpolationMode.BILINEAR),
        lambda x: F.posterize(x, max(1, int(4 * level))),
        lambda x: F.solarize(x, 256 * level),
        lambda x: F.adjust_saturation(x, factor),
        lambda x: F.adjust_contrast(x, factor),
        lambda x: F.adjust_brightness(x, factor),
        lambda x: F.adjust_sharpness(x, factor),
        F.autocontrast,
        F.equalize,
        F.invert,
        cutout,
    ]
    for k in sorted(torch.randperm(len(table), generator=g, device=g.device)[:ops].tolist()):
        x = table[k](x)
    return x


def _crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                 g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering area fraction ~U(scale) with log-uniform aspect ratio
    in `ratio`; the algorithm of torchvision's RandomResizedCrop (10 tries, then a center crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(_uniform(g, 0, 1) * (height - h + 1))
            left = int(_uniform(g, 0, 1) * (width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue in a random order, as torchvision's ColorJitter
    (factors ~U[1 - s, 1 + s], hue ~U[-h, h])."""
    ops = []
    for strength, op in ((cfg.brightness, F.adjust_brightness), (cfg.contrast, F.adjust_contrast), (cfg.saturation, F.adjust_saturation)):
        if strength > 0:
            ops.append((op, _uniform(g, max(0.0, 1.0 - strength), 1.0 + strength)))
    if cfg.hue > 0:
        ops.append((_adjust_hue, _uniform(g, -cfg.hue, cfg.hue)))
    for k in torch.randperm(len(ops), generator=g, device=g.device).tolist():
        op, factor = ops[k]
        x = op(x, factor)
    return x


# RGB -> YIQ (NTSC): Y is luma, (I, Q) the chroma plane that a hue shift rotates.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _adjust_hue(x_N3HW: torch.Tensor, hue: float) -> torch.Tensor:
    """Rotate hue by `hue` turns (in [-0.5, 0.5]) as a linear map in YIQ space, as TensorFlow
    Addons' adjust_hsv_in_yiq does:

        rgb' = clamp(A^-1 R(-2 pi hue) A rgb, 0, 1),  A = RGB->YIQ,  R rotates the (I, Q) plane.

    One 3x3 matrix per clip; 7-25x faster on CPU than torchvision's exact HSV round trip
    (F.adjust_hue), whose direction it follows (red -> yellow -> green for hue > 0)."""
    a = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    c, s = math.cos(2 * math.pi * hue), math.sin(2 * math.pi * hue)
    rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]], dtype=torch.float64)
    m = (torch.linalg.inv(a) @ rot @ a).to(x_N3HW)
    return torch.einsum("ij,njhw->nihw", m, x_N3HW).clamp_(0, 1)
