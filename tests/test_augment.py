"""Clip augmentations: shapes and dtypes, one draw per clip applied to all its frames, determinism
under the passed generator (and only it), what each toggle does, and the evaluation crop."""

import pytest
import torch
import torchvision.transforms.v2.functional as F

from re2tal.config import AugmentConfig
from re2tal.data.augment import _adjust_hue, augment_clips

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ALL = AugmentConfig(random_resized_crop=True, hflip=True, rotation=True, color_jitter=True)
NONE = AugmentConfig(random_resized_crop=False, hflip=False, temporal_jitter=False, rotation=False, color_jitter=False)


def clips(b=2, n=6, h=40, w=48, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def augment(x, cfg=ALL, seed=0, training=True, size=32):
    return augment_clips(x, cfg, size, MEAN, STD, torch.Generator().manual_seed(seed), training)


def normalised(x_BNHW3: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W, 3) uint8 -> (B, 3, N, H, W) normalised float, no augmentation."""
    x = x_BNHW3.permute(0, 4, 1, 2, 3).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1, 1)


@pytest.mark.parametrize("training", [True, False])
def test_shapes_and_dtype(training):
    out = augment(clips(), training=training)
    assert out.shape == (2, 3, 6, 32, 32) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all()


def test_deterministic_under_seed_and_seeds_differ():
    x = clips()
    assert torch.equal(augment(x, seed=1), augment(x, seed=1))
    assert not torch.allclose(augment(x, seed=1), augment(x, seed=2))


def test_uses_only_the_passed_generator():
    x = clips()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = augment(x, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG neither used nor moved
    torch.manual_seed(999)
    assert torch.equal(augment(x, seed=5), a)


def test_one_draw_per_clip_applied_to_every_frame():
    """Identical frames stay identical after augmentation; two identical clips of a batch get
    different draws."""
    frame = clips(b=1, n=1, h=40, w=48)
    x = frame.expand(2, 8, 40, 48, 3).contiguous()
    for seed in range(5):
        out = augment(x, seed=seed)
        assert torch.equal(out, out[:, :, :1].expand_as(out))  # all frames of a clip equal
        assert not torch.allclose(out[0], out[1])  # clips drawn independently


def test_evaluation_is_a_center_crop():
    x = clips(h=40, w=48)
    expected = normalised(x)[..., 4:36, 8:40]
    assert torch.allclose(augment(x, training=False), expected, atol=1e-6)
    assert torch.allclose(augment(x, cfg=NONE, training=True), expected, atol=1e-6)  # no toggle: same as eval
    # frames smaller than the crop are scaled up, never padded
    small = augment(clips(h=24, w=30), training=False)
    assert small.shape == (2, 3, 6, 32, 32) and small.abs().sum(1).amin() > 0


def test_hflip_mirrors_the_center_crop_about_half_the_time():
    x = clips()
    crop = augment(x, cfg=NONE, training=False)
    flips = []
    for seed in range(40):
        out = augment(x, cfg=NONE.model_copy(update={"hflip": True}), seed=seed)
        for clip, ref in zip(out, crop):
            assert torch.equal(clip, ref) or torch.equal(clip, ref.flip(-1))
            flips.append(torch.equal(clip, ref.flip(-1)))
    assert 0.3 < sum(flips) / len(flips) < 0.7


def test_random_resized_crop_covers_the_configured_area():
    """A frame whose pixels encode their own coordinates shows which source region was cropped."""
    h, w = 60, 80
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([ys * 4, xs * 3, torch.zeros_like(ys)], -1).to(torch.uint8)  # R = 4y, G = 3x
    x = coords.expand(1, 3, h, w, 3).contiguous()
    cfg = NONE.model_copy(update={"random_resized_crop": True, "crop_scale": (0.25, 0.5)})
    areas = []
    for seed in range(20):
        out = augment(x, cfg=cfg, seed=seed, size=32)[0, :, 0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        span_y = (out[0, -1, :].mean() - out[0, 0, :].mean()) * 255 / 4 * 32 / 31
        span_x = (out[1, :, -1].mean() - out[1, :, 0].mean()) * 255 / 3 * 32 / 31
        areas.append((span_y * span_x / (h * w)).item())
    assert all(0.2 < a < 0.55 for a in areas), areas
    assert max(areas) - min(areas) > 0.08  # the crop varies


def test_rotation_turns_the_frame_and_fills_corners_with_the_mean():
    x = torch.full((1, 2, 32, 32, 3), 255, dtype=torch.uint8)  # white
    cfg = NONE.model_copy(update={"rotation": True, "rotation_degrees": 45.0})
    white = normalised(x)[0, :, 0, 0, 0].view(3, 1, 1)
    filled = []
    for seed in range(10):
        frame = augment(x, cfg=cfg, seed=seed)[0, :, 0]
        assert torch.allclose(frame[:, 12:20, 12:20], white.expand(3, 8, 8), atol=1e-5)  # the centre stays
        ratio = frame / white  # 1: white, 0: the mean colour (zero after normalisation)
        assert ratio.min() > -1e-5 and ratio.max() < 1 + 1e-5
        filled.append((ratio[0] < 0.5).sum().item())
    assert max(filled) > 100 and len(set(filled)) > 5  # corners filled, by varying angles


def test_color_jitter_changes_colours_not_layout():
    x = clips(b=1)
    cfg = NONE.model_copy(update={"color_jitter": True})
    out = augment(x, cfg=cfg, seed=3)
    ref = augment(x, cfg=NONE, training=False)
    assert not torch.allclose(out, ref, atol=1e-3)
    # a constant frame stays constant: colour ops are per pixel (contrast uses a per-frame mean)
    flat = augment(torch.full((1, 3, 32, 32, 3), 90, dtype=torch.uint8), cfg=cfg, seed=3)
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat), atol=1e-5)


def test_hue_shift_follows_torchvision_direction():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 3, 1)
    for hue in (0.1, -0.1):
        ours, ref = _adjust_hue(rgb, hue), F.adjust_hue(rgb, hue)
        # the dominant channel of each primary moves the same way
        assert torch.equal((ours - rgb).sign()[0, :, :, 0].argmax(0), (ref - rgb).sign()[0, :, :, 0].argmax(0))
    assert torch.allclose(_adjust_hue(rgb, 0.0), rgb, atol=1e-6)
    grey = torch.full((1, 3, 2, 2), 0.4)
    assert torch.allclose(_adjust_hue(grey, 0.3), grey, atol=1e-6)  # greys have no hue


def test_rejects_non_uint8_or_wrong_layout():
    with pytest.raises(ValueError, match="uint8"):
        augment(clips().float())
    with pytest.raises(ValueError, match="uint8"):
        augment(clips().permute(0, 1, 4, 2, 3))


def test_rand_augment_applies_one_draw_to_every_frame_and_varies_by_clip():
    x = clips(b=1, n=1, h=40, w=48).expand(1, 4, 40, 48, 3).contiguous()
    cfg = NONE.model_copy(update={"rand_augment": True})
    plain = augment(x, cfg=NONE.model_copy(update={"random_resized_crop": False}))
    outs = [augment(x, cfg=cfg, seed=seed) for seed in range(8)]
    for out in outs:
        assert torch.equal(out, out[:, :, :1].expand_as(out))  # the same ops and signs on every frame
        assert not torch.allclose(out, plain, atol=1e-3)
    assert len({round(o.sum().item(), 2) for o in outs}) == len(outs)  # other ops / signs per draw
    assert torch.equal(augment(x, cfg=cfg, seed=3), outs[3])


def test_rand_augment_op_is_one_of_mmactions_fifteen():
    """One op per draw (ops=1): every result is one of the 15 at magnitude 0.9 (either sign), and
    over 80 draws invert and the 128-grey cutout both occur."""
    from torchvision.transforms import InterpolationMode

    from re2tal.data.augment import _rand_augment

    x = clips(b=1, n=2, h=20, w=30)[0].permute(0, 3, 1, 2).contiguous()
    bil = InterpolationMode.BILINEAR
    known = {"invert": F.invert(x), "equalize": F.equalize(x), "autocontrast": F.autocontrast(x), "posterize": F.posterize(x, 3),
             "solarize": F.solarize(x, 230.4), "colour": F.adjust_saturation(x, 1.72), "contrast": F.adjust_contrast(x, 1.72),
             "brightness": F.adjust_brightness(x, 1.72), "sharpness": F.adjust_sharpness(x, 1.72)}
    for sgn in (1, -1):
        known[f"shear_x{sgn}"] = F.affine(x, 0.0, [0, 0], 1.0, [17.19 * 0.9 * sgn, 0.0], interpolation=bil)
        known[f"shear_y{sgn}"] = F.affine(x, 0.0, [0, 0], 1.0, [0.0, 17.19 * 0.9 * sgn], interpolation=bil)
        known[f"translate_x{sgn}"] = F.affine(x, 0.0, [round(0.18 * 30) * sgn, 0], 1.0, [0.0, 0.0])
        known[f"translate_y{sgn}"] = F.affine(x, 0.0, [0, round(0.18 * 20) * sgn], 1.0, [0.0, 0.0])
        known[f"rotate{sgn}"] = F.rotate(x, 27.0 * sgn, interpolation=bil)
    seen = set()
    for seed in range(80):
        out = _rand_augment(x, 1, 0.9, torch.Generator().manual_seed(seed))
        names = [k for k, v in known.items() if torch.equal(out, v)]
        changed = out != x
        if not names and changed.any():  # cutout: a 4x4 square (0.18 of 20) of 128, the rest untouched
            assert (out[changed] == 128).all() and changed.any(dim=1).sum().item() <= 2 * 4 * 4
            names = ["cutout"]
        assert names, f"draw {seed} is none of the 15 ops"
        seen.update(names)
    assert {"invert", "cutout"} <= seen and len(seen) >= 10


def test_evaluation_resize_keeps_the_whole_short_side():
    x = clips(b=1, n=2, h=40, w=60)
    cfg = NONE.model_copy(update={"eval_resize": True})
    frames = x[0].permute(0, 3, 1, 2)
    want = F.center_crop(F.resize(frames, [32], antialias=True), [32, 32]).permute(0, 2, 3, 1)[None]
    torch.testing.assert_close(augment(x, cfg=cfg, training=False), normalised(want))
    assert not torch.allclose(augment(x, cfg=NONE, training=False), normalised(want), atol=1e-3)
