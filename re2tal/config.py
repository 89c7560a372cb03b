"""The typed config tree.

One pydantic model per section; YAML is only its serialised form. Unknown keys, wrong types and
impossible combinations are rejected at load with one line naming the key. Models are frozen:
nobody mutates a config after load; variants (tune trials, CLI overrides) are made by
`with_overrides`, which validates again.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from re2tal.errors import BadInput

# Schemes fsspec can open that we support for videos, annotations and checkpoints.
URL_SCHEMES = ("", "file", "s3", "s3a", "gs", "gcs", "http", "https", "memory")



class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def check_url(value: str | None) -> str | None:
    """A URL fsspec can open (s3://, gs://, http(s)://, file://, or a plain local path)."""
    if value is None:
        return None
    if not value.strip():
        raise ValueError("must not be empty")
    scheme = urlsplit(value).scheme
    if len(scheme) == 1:  # a Windows drive letter is a plain path
        scheme = ""
    if scheme not in URL_SCHEMES:
        raise ValueError(f"unsupported URL scheme {scheme!r} in {value!r} (use one of s3://, gs://, http(s)://, file:// or a local path)")
    return value


def clip_annotations(url: str) -> bool:
    """Whether an annotation file lists recognition clips (CSV, re2tal.data.clips) rather than
    ActivityNet-format detection annotations (JSON)."""
    return url.lower().endswith(".csv")


# --------------------------------------------------------------------------------------------
# data, storage, augmentation


def _pair(lo_min: float, hi_max: float):
    def check(v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        lo, hi = v
        if not (lo_min <= lo <= hi <= hi_max):
            raise ValueError(f"needs {lo_min} <= low <= high <= {hi_max}, got {list(v)}")
        return v

    return check


class SynthConfig(Section):
    """A synthetic TAL dataset (`re2tal data synth`), generated at `data.annotations`' location
    when that file does not exist yet. The embedded default dataset of the debug mode."""

    videos: PositiveInt = Field(48, description="Number of videos (training + validation).")
    val_videos: PositiveInt = Field(12, description="How many of them form the validation subset.")
    classes: int = Field(4, ge=1, le=48, description="Number of action classes: distinct (shape, motion pattern) pairs, at most 48.")
    duration_s: PositiveFloat = Field(60.0, description="Length of each video in seconds.")
    fps: PositiveFloat = Field(10.0, description="Frame rate of the written mp4 files.")
    size: int = Field(64, ge=32, le=4096, description="Frame height and width in pixels, a multiple of 32.")
    seed: int = Field(0, description="Seed of the generator: same seed, same videos.")

    @model_validator(mode="after")
    def _val_fits(self) -> "SynthConfig":
        if self.val_videos >= self.videos:
            raise ValueError(f"val_videos: {self.val_videos} leaves no training videos out of videos={self.videos}")
        if self.size % 32:  # h264 4:2:0 needs even sizes; decord 0.6 misreads some small ones (48, 72: dmlc/decord#336)
            raise ValueError(f"size: {self.size} is not a multiple of 32")
        if round(self.duration_s * self.fps) < 30:
            raise ValueError(f"duration_s: {self.duration_s:g} s at {self.fps:g} fps gives {round(self.duration_s * self.fps)} frames; a video needs at least 30")
        return self


class DataConfig(Section):
    """Where the videos and annotations are, and how frames are sampled from long videos."""

    annotations: str = Field(description="URL of the ActivityNet-format annotation JSON (s3://, gs://, http(s)://, file:// or path); for `re2tal finetune` a CSV of recognition clips (Kinetics' `label,youtube_id,time_start,time_end,split`, or `id`/`url`, `label`, `start`, `end`, `subset`). Required.")
    video_root: str | None = Field(None, description="URL prefix of the videos: a video's file is its `url` in the annotations, else `<video_root>/<id>.<video_ext>` (Kinetics CSV: `<video_root>/<youtube_id>_<start:06d>_<end:06d>.<video_ext>`, `{split}` in video_root replaced by the row's split). Default: the annotation file's folder.")
    video_ext: str = Field("mp4", description="File extension of videos under video_root.")
    video_prefix: str = Field("", description="File-name prefix of videos under video_root (ActivityNet files are `v_<id>.mp4`: `v_`).")
    use_annotation_urls: bool = Field(True, description="Take a video's `url` from the annotations when it has one. ActivityNet's are YouTube pages: set false to read `<video_root>/<video_prefix><id>.<video_ext>`.")
    train_subset: str = Field("training", description="Annotation subset used for training.")
    val_subset: str = Field("validation", description="Annotation subset used for evaluation.")
    sampling: Literal["uniform", "sliding"] = Field("uniform", description="`uniform`: num_frames spread over the whole video (ActivityNet style). `sliding`: windows of num_frames consecutive samples (THUMOS style).")
    num_frames: PositiveInt = Field(768, description="Frames per clip fed to the backbone.")
    frame_interval: PositiveInt = Field(1, description="sliding: take every k-th frame of the video.")
    window_stride: PositiveInt | None = Field(None, description="sliding: sampled frames between the starts of consecutive evaluation windows. Default: num_frames // 2 (50% overlap).")
    random_truncate: bool = Field(True, description="sliding, training: pick a random window of each video instead of the first.")
    truncate_threshold: float | None = Field(None, gt=0.0, le=1.0, description="sliding, training with random_truncate: OpenTAD's random_trunc rule: window starts (whole samples) drawn uniformly, up to 200, until the window holds at least this fraction of some annotated segment; only segments with this fraction inside are the clip's targets. None: a random window overlapping a randomly chosen segment, every overlapping segment a target.")
    truncate_crop_ratio: tuple[float, float] | None = Field(None, description="With truncate_threshold: a video not longer than a window is cut to a random length in [low, high] x its length (OpenTAD's crop_ratio), the rest of the window padding. None: taken whole.")
    last_window: Literal["padded", "end_aligned"] = Field("padded", description="sliding, evaluation: the last window runs past the video's end with padding, or is moved back to end at its last sample (OpenTAD's).")
    frame_size: PositiveInt = Field(224, description="Side of the square crop fed to the backbone (pixels).")
    short_side: PositiveInt | None = Field(None, description="Frames are resized so their short side is this before cropping. Default: frame_size.")
    batch_size: PositiveInt = Field(1, description="Clips per worker per step.")
    loader: Literal["threads", "ray_data"] = Field("threads", description="Training loader. `threads`: loader_threads decoding threads inside each training worker. `ray_data`: a Ray Data streaming pipeline, one video per one-CPU task on any node with free CPUs (CPU-only nodes included), read by each worker with `ray.train.get_dataset_shard`; the same clips as `threads` for a seed. Evaluation always uses `threads`.")
    loader_threads: PositiveInt = Field(2, description="Decoding threads per worker (each decodes one video at a time).")
    prefetch_videos: NonNegativeInt = Field(2, description="Videos fetched from storage ahead of those being decoded, per worker (also the number of fetching threads, at least 1).")
    max_bad_videos: NonNegativeInt = Field(10, description="Corrupt / missing / unreadable videos skipped (and logged with id and URL) per worker and epoch before the run fails.")
    decode_timeout_s: PositiveFloat = Field(300.0, description="A video whose next clip takes longer than this to decode is skipped as bad.")
    ignore_labels: list[str] = Field(default_factory=list, description="Annotated segments with these labels are left out everywhere (no class, no target, no ground truth), e.g. THUMOS-14's `Ambiguous`, which OpenTAD skips.")
    min_segment_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Training targets: segments of train_subset videos shorter than this fraction of their video are left out (OpenTAD's ActivityNet filter_gt: 0.01).")
    blocked_videos: str | None = Field(None, description="URL of a JSON list of video ids (or a text file, one id a line) left out of every subset, e.g. OpenTAD's ActivityNet `blocked.json` (validation videos no longer on YouTube).")
    synth: SynthConfig | None = Field(None, description="Generate a synthetic dataset at `annotations`' location if it does not exist.")
    features: str | None = Field(None, description="URL of pre-extracted features (`re2tal extract`'s output: `<features>/<video_id>.npy` of shape (clips, channels) and `<features>/features.json`): `re2tal train` then trains the localization head on them (no backbone, no decoding; `sampling`, `num_frames`, `frame_interval` and `window_stride` give the windows in seconds as for frames). Default: train end to end from the videos.")

    _urls = field_validator("annotations", "video_root", "blocked_videos", "features")(check_url)
    _crop = field_validator("truncate_crop_ratio")(_pair(1e-3, 1.0))

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            frames, size = data.get("num_frames", 768), data.get("frame_size", 224)
            if data.get("window_stride") is None and isinstance(frames, int):
                data["window_stride"] = max(1, frames // 2)
            if data.get("short_side") is None and isinstance(size, int):
                data["short_side"] = size
        return data

    @model_validator(mode="after")
    def _sizes(self) -> "DataConfig":
        if self.short_side is not None and self.short_side < self.frame_size:
            raise ValueError(f"short_side: {self.short_side} is smaller than frame_size={self.frame_size}; frames cannot be cropped to that size")
        if self.truncate_crop_ratio is not None and self.truncate_threshold is None:
            raise ValueError("truncate_crop_ratio: applies to OpenTAD's truncation rule; set truncate_threshold too")
        return self


class StorageConfig(Section):
    """Object-storage access and the node-local video cache. Credentials are best left to the
    standard AWS / GCP environment; if given here they are never logged."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...). Default: AWS.")
    region: str | None = Field(None, description="S3 region.")
    access_key_id: SecretStr | None = Field(None, description="S3 access key (default: environment / instance profile).")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key (default: environment / instance profile).")
    anon: bool = Field(False, description="Anonymous access (public buckets).")
    cache_dir: str = Field("~/.cache/re2tal/videos", description="Node-local directory of fetched remote videos, shared by the worker processes of a node (`~` and `$VARS` expanded on each node; a relative path is relative to each worker's working directory). Local videos are read in place.")
    cache_max_gb: PositiveFloat = Field(20.0, description="Size limit of the video cache (GB = 1e9 bytes); least recently used videos not in use are evicted.")
    retries: NonNegativeInt = Field(5, description="Retries with exponential backoff on transient storage errors (throttling, connection resets, truncated transfers), per request and per object.")
    timeout_s: PositiveFloat = Field(120.0, description="Time limit for fetching one object, retries included.")

    _urls = field_validator("endpoint_url")(check_url)

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> "StorageConfig":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            missing = "secret_access_key" if self.secret_access_key is None else "access_key_id"
            raise ValueError(f"{missing}: access_key_id and secret_access_key must be given together")
        return self


class AugmentConfig(Section):
    """Training-time clip augmentations (one random draw per clip, applied to all its frames).
    The five of Re²TAL's ablation; each is a toggle. Evaluation uses resize + center crop.
    Temporal jitter is applied by the frame sampler (it picks which frames are decoded); the four
    spatial / colour ones by `re2tal.data.augment.augment_clips` on the worker's device."""

    random_resized_crop: bool = Field(True, description="Random resized crop.")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="Area fraction range of the random crop.")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="Aspect ratio range of the random crop.")
    hflip: bool = Field(True, description="Random horizontal flip (p = 0.5).")
    temporal_jitter: bool = Field(True, description="Shift each sampled frame index randomly within its sampling interval.")
    rotation: bool = Field(False, description="Random rotation.")
    rotation_degrees: NonNegativeFloat = Field(10.0, description="Maximum rotation angle.")
    rand_augment: bool = Field(False, description="RandAugment as mmaction's ImgAug(transforms='default') that OpenTAD's end-to-end configs use: rand_augment_ops of its 15 image ops (shear, translate, rotate, posterize, solarize, colour, contrast, brightness, sharpness, autocontrast, equalize, invert, cutout), distinct, in that order, at rand_augment_magnitude.")
    rand_augment_ops: PositiveInt = Field(2, le=15, description="RandAugment: ops applied per clip.")
    rand_augment_magnitude: float = Field(0.9, ge=0.0, le=1.0, description="RandAugment: strength as a fraction of each op's maximum (mmaction's 9 / 10).")
    color_jitter: bool = Field(False, description="Random brightness / contrast / saturation / hue.")
    brightness: NonNegativeFloat = Field(0.4, description="Color jitter brightness strength.")
    contrast: NonNegativeFloat = Field(0.4, description="Color jitter contrast strength.")
    saturation: NonNegativeFloat = Field(0.4, description="Color jitter saturation strength.")
    hue: float = Field(0.1, ge=0.0, le=0.5, description="Color jitter hue strength (<= 0.5).")

    eval_resize: bool = Field(False, description="Evaluation: resize frames so their short side is data.frame_size before the centre crop, which then spans the whole short side (OpenTAD's Resize(-1, 224) + CenterCrop(224)); false: a centre crop of the decoded frames (short side data.short_side).")

    _scale = field_validator("crop_scale")(_pair(1e-3, 1.0))
    _ratio = field_validator("crop_ratio")(_pair(1e-2, 100.0))


# --------------------------------------------------------------------------------------------
# model


BackboneName = Literal["swin_t", "swin_s", "swin_b", "pst_t", "slowfast_r50", "slowfast_r101", "tada2d_r50",
                       "r2plus1d_18", "r3d_18", "mc3_18", "mvit_v2_s", "vit_s", "vit_b", "vit_l", "vit_h", "vit_g"]
SWIN_FAMILY = ("swin_t", "swin_s", "swin_b", "pst_t")
VIDEO_RESNETS = ("r2plus1d_18", "r3d_18", "mc3_18")
VITS = ("vit_s", "vit_b", "vit_l", "vit_h", "vit_g")
# backbones whose sizes are depths / embed_dim / num_heads (transformers)
TRANSFORMERS = (*SWIN_FAMILY, "mvit_v2_s", *VITS)
# blocks per stage of each backbone, when the config gives none
DEFAULT_DEPTHS = {"swin_t": [2, 2, 6, 2], "swin_s": [2, 2, 18, 2], "swin_b": [2, 2, 18, 2], "pst_t": [2, 2, 6, 2],
                  "slowfast_r50": [3, 4, 6, 3], "slowfast_r101": [3, 4, 23, 3], "tada2d_r50": [3, 4, 6, 3],
                  "r2plus1d_18": [2, 2, 2, 2], "r3d_18": [2, 2, 2, 2], "mc3_18": [2, 2, 2, 2], "mvit_v2_s": [1, 2, 11, 2],
                  "vit_s": [12], "vit_b": [12], "vit_l": [24], "vit_h": [32], "vit_g": [40]}
# attention window of each Swin, when the config gives none (pst_t: 2-D windows of each frame)
DEFAULT_WINDOW = {"swin_t": (8, 7, 7), "swin_s": (8, 7, 7), "swin_b": (8, 7, 7), "pst_t": (1, 7, 7)}
# other sizes and settings of the published models (torchvision's swin3d_b, mvit_v2_s, video
# resnets' weights), when the config gives none; the others take the fields' defaults
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "swin_b": {"embed_dim": 128, "num_heads": [4, 8, 16, 32]},
    "mvit_v2_s": {"num_heads": [1, 2, 4, 8], "drop_path": 0.2, "pixel_mean": (0.45, 0.45, 0.45), "pixel_std": (0.225, 0.225, 0.225)},
    **{name: {"pixel_mean": (0.43216, 0.394666, 0.37645), "pixel_std": (0.22803, 0.22145, 0.216989)} for name in VIDEO_RESNETS},
    # VideoMAE ViT-S / B / L / H (patch 16) and VideoMAEv2 ViT-g (patch 14), tubelet 2
    "vit_s": {"embed_dim": 384, "num_heads": [6], "patch_size": (2, 16, 16)},
    "vit_b": {"embed_dim": 768, "num_heads": [12], "patch_size": (2, 16, 16)},
    "vit_l": {"embed_dim": 1024, "num_heads": [16], "patch_size": (2, 16, 16)},
    "vit_h": {"embed_dim": 1280, "num_heads": [16], "patch_size": (2, 16, 16)},
    "vit_g": {"embed_dim": 1408, "num_heads": [16], "patch_size": (2, 14, 14), "mlp_ratio": 48 / 11},
}


# what BackboneConfig resolves by the backbone's name when a config gives none
FAMILY_KEYS = ("depths", "window_size", "patch_shift", *sorted({key for d in FAMILY_DEFAULTS.values() for key in d}))


class AdapterConfig(Section):
    """vit_*: AdaTAD's temporal adapters after chosen blocks (down-projection, depth-wise temporal
    conv k=3 over the whole video, zero-initialised up-projection)."""

    ratio: PositiveFloat = Field(0.25, description="Hidden channels of an adapter as a fraction of the block's.")
    blocks: list[NonNegativeInt] | None = Field(None, description="Indices of the blocks followed by an adapter (AdaTAD: all of ViT-S / B / L / H; 20-39 of ViT-g). None: every block.")


class PatchShiftConfig(Section):
    """Temporal patch shift (TPS): pst_t's pattern, or TPS added to swin_t / swin_s / swin_b's 3-D windows (ours, not PST)."""

    pattern: Literal["A", "B", "C", "D"] = Field("C", description="Shift pattern of the TPS paper: A, B (2x2 tiles over 3 / 4 frames), C (3x3 over 9 frames; the authors' code and weights), D (4x4 over 16 frames).")
    blocks: Literal["alternate", "all"] = Field("alternate", description="Which blocks shift: `alternate` = the odd blocks of each stage (those with shifted windows), as the paper; `all`: swin_t / swin_s / swin_b only (pst_t's even blocks channel-shift, as its authors').")
    boundary: Literal["cyclic", "zero"] = Field("cyclic", description="Clip ends: `cyclic` rolls patches around (the authors' code, so PST weights behave as trained); `zero` lets patches shifted past an end read zeros (no mixing of a clip's first and last frames).")


class BackboneConfig(Section):
    """The video backbone, its weights and how it is run (reversible or not)."""

    name: BackboneName = Field("swin_t", description="Backbone: swin_t (Video Swin-T; with patch_shift, TPS in its 3-D windows, ours), pst_t (PST-T as its authors built it: 2-D windows per frame, temporal patch and channel shifts), slowfast_r50 / slowfast_r101 (SlowFast ResNet-50 / 101), tada2d_r50 (TAda2D ResNet-50, TAdaConv in every bottleneck, temporal stride 1); swin_s / swin_b (Video Swin-S / B, torchvision's swin3d_s / swin3d_b sizes; patch_shift as on swin_t), r2plus1d_18 / r3d_18 / mc3_18 (torchvision's video ResNet-18s), mvit_v2_s (MViTv2-S, torchvision's mvit_v2_s; features from the last stage's tokens), vit_s / vit_b / vit_l / vit_h (VideoMAE ViT-S / B / L / H, patch 16) and vit_g (VideoMAEv2 ViT-g, patch 14): joint space-time attention within chunks of chunk_frames frames, optionally with AdaTAD's temporal adapters (`adapter`); with reversible=true, Re²Swin-T / Re²PST-T / Re²SlowFast / Re²TAda2D and the Re² versions of the others.")
    reversible: bool = Field(True, description="Rewire into reversible stages (Re²TAL): activations are recomputed in backward, not stored.")
    activation_checkpointing: bool = Field(False, description="Per-block activation checkpointing (the non-reversible way to save memory).")
    fp32_streams: bool = Field(True, description="Reversible: keep the two residual streams in fp32 while blocks run in low precision (exact reconstruction). False keeps them in the compute precision, half the bytes, but reconstruction drifts (bf16, trained Re²Swin: 1-2% per stage, gradients 1-9% off; README, `re2tal plan`).")
    piece_size: NonNegativeInt | None = Field(None, description="Reversible: residual functions that are local along a dimension run piece by piece in the forward and in the backward's recomputation, in pieces of at most this many elements of the stage tensor (rounded to whole windows / samples, at least one): MLP branches along tokens, window attention in whole windows along T (swin_*, not with patch_shift) or H (pst_t), the bottlenecks of slowfast_* / tada2d_r50 / the video ResNets along the batch when their BatchNorm is frozen (norm_eval, frozen_stages, eval mode). The backward's transient is then one piece's instead of the stage's; gradients are the same up to float rounding. None: 2^24 on a GPU (smaller pieces leave its kernels launch-bound), 2^20 on a CPU; 0: every function whole.")
    pretrained: str | None = Field(None, description="Path / URL of pretrained weights, loaded as is, classifier dropped: for swin_t (also with patch_shift) a torchvision swin3d_t state dict (e.g. the Swin3D_T_Weights.KINETICS400_V1 file), for pst_t the TPS authors' mmaction checkpoint (SwinTransformer2D_TPS, e.g. their Kinetics-400 PST-T; `backbone.` stripped, `cls_head.*` dropped), for slowfast_* a pytorchvideo slowfast_r50 / slowfast_r101 state dict (its model zoo's Kinetics checkpoints; with tadaconv the route functions keep their initialisation); for swin_t and slowfast_* also an mmaction Recognizer3D checkpoint (`state_dict` with `backbone.*`; `cls_head.*` dropped): mmaction's Video Swin-T / SlowFast Kinetics files, or the Re²TAL authors' Re²Swin-T / Re²SlowFast-101 (`SwinTransformer3D_inv` / `ResNet3dSlowFast_inv`, which need reversible=true); for tada2d_r50 an official TAdaConv TAda2D checkpoint ({model_state: {backbone.*, head.*}}) or a torchvision resnet50 state dict (ImageNet; route functions and temporal aggregation keep their zero initialisation); for swin_s / swin_b, r2plus1d_18 / r3d_18 / mc3_18 and mvit_v2_s torchvision's state dict of the same name (swin3d_s / swin3d_b, ...; classifier dropped); for vit_* a VideoMAE / VideoMAEv2 file as OpenTAD's AdaTAD loads it (mmaction's VisionTransformer keys, e.g. OpenTAD's converted `vit-giant-p14_videomaev2-hybrid_pt_1200e_k710_ft_my.pth`, bare or in an mmaction checkpoint) or the release's (`vit_g_hybrid_pt_1200e_k710_ft.pth`: `patch_embed.proj`, `mlp.fc1 / fc2`, mapped on loading); adapters absent from the file keep their initialisation. None: random init.")
    drop_path: float = Field(0.1, ge=0.0, lt=1.0, description="Transformers (swin_*, pst_t, mvit_v2_s, vit_*): stochastic depth rate (linearly increasing over blocks; vit_*: one mask per chunk, as AdaTAD, also in frozen blocks). Default 0.1, mvit_v2_s 0.2 (torchvision's).")
    frozen_stages: int = Field(-1, ge=-1, description="Stages whose parameters are frozen and kept in eval mode, i.e. without drop path or BatchNorm updates (-1: none, 0: the stem / patch embedding, k: the stem + first k stages with the patch merging / fusion after each; vit_*: 0 the patch embedding, 1 everything). AdaTAD's frozen ViT is `freeze: all_but_adapters`.")
    norm_eval: bool = Field(False, description="Keep BatchNorm layers in eval mode (running statistics frozen) during training, as OpenTAD for slowfast_*. No effect on the transformers (swin_*, pst_t, mvit_v2_s): LayerNorm acts the same in train and eval.")
    depths: list[PositiveInt] = Field([2, 2, 6, 2], min_length=1, description="Blocks per stage. Default: the backbone's (swin_t / pst_t 2-2-6-2, swin_s / swin_b 2-2-18-2, slowfast_r50 3-4-6-3, slowfast_r101 3-4-23-3, video ResNet-18s 2-2-2-2, mvit_v2_s 1-2-11-2: each stage after the first starts with its query-pooling block; vit_s / b / l / h / g one stage of 12 / 12 / 24 / 32 / 40 blocks).")
    embed_dim: PositiveInt = Field(96, description="swin_* / pst_t / mvit_v2_s / vit_*: channels of the first stage (Swin-T / S, MViTv2-S: 96; swin_b: 128, its default; vit_s / b / l / h / g: 384 / 768 / 1024 / 1280 / 1408).")
    num_heads: list[PositiveInt] = Field([3, 6, 12, 24], min_length=1, description="swin_* / pst_t / mvit_v2_s / vit_*: attention heads per stage. Default 3-6-12-24; swin_b 4-8-16-32, mvit_v2_s 1-2-4-8; vit_s / b / l / h / g [6] / [12] / [16] / [16] / [16].")
    patch_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field((2, 4, 4), description="swin_* / pst_t / vit_*: patch embedding size (T, H, W). Default: the backbone's (swin_* / pst_t 2-4-4; vit_s / b / l / h 2-16-16, vit_g 2-14-14: tubelet 2).")
    mlp_ratio: PositiveFloat = Field(4.0, description="vit_*: hidden channels of the MLPs per channel (vit_g: 48 / 11, the others 4).")
    chunk_frames: PositiveInt = Field(16, description="vit_*: attention runs within chunks of this many frames (the clip length the weights saw; AdaTAD: 16), the chunks of a video batched, their features concatenated in time. data.num_frames must be a multiple.")
    adapter: AdapterConfig | None = Field(None, description="vit_*: AdaTAD's temporal adapters. None: a plain ViT.")
    freeze: Literal["none", "all_but_adapters"] = Field("none", description="vit_*: `all_but_adapters` trains only the adapters (and the head), as AdaTAD; needs `adapter` and reversible=false (Re² changes the function, so a frozen pretrained ViT must not be rewired).")
    window_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field((8, 7, 7), description="swin_* / pst_t: attention window (T, H, W). Default: the backbone's (swin_* 8-7-7; pst_t 1-7-7, T must be 1).")
    alpha: PositiveInt = Field(4, description="slowfast_*: frames per slow-pathway frame (the fast pathway sees all); the output has T / alpha steps.")
    fusion_kernel: PositiveInt | None = Field(None, description="slowfast_*: temporal size of the fast-to-slow fusion convs (odd). None: that of the `pretrained` file's fusion convs, without one pytorchvideo's (r50: 7, r101: 5; mmaction's R101 file and the Re²TAL authors' Re²SlowFast-101 have 7).")
    tadaconv: bool = Field(False, description="slowfast_*: make every bottleneck's spatial conv_b (both pathways) a TAdaConv with its route function (SlowFast + TAdaConv); equals plain SlowFast at initialisation. tada2d_r50 has TAdaConv built in.")
    patch_shift: PatchShiftConfig | None = Field(None, description="Temporal patch shift: for pst_t its settings (default: pattern C, alternate, cyclic); on swin_t / swin_s / swin_b it adds TPS to Video Swin's 3-D windows with zero new parameters (ours, not PST; torchvision's swin3d_* weights). None on swin_*: plain Video Swin.")
    pixel_mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="Per-channel mean of the pretrained model's input, 0-1 scale (RGB / 255). The default is torchvision's and mmaction's ([123.675, 116.28, 103.53] / 255: their Swin / SlowFast and the Re²TAL authors' files); pytorchvideo's SlowFast: [0.45, 0.45, 0.45]. Defaults of the torchvision weights: video ResNet-18s [0.43216, 0.394666, 0.37645], mvit_v2_s [0.45, 0.45, 0.45].")
    pixel_std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="Per-channel std of the pretrained model's input, 0-1 scale. The default is torchvision's and mmaction's ([58.395, 57.12, 57.375] / 255); pytorchvideo's SlowFast: [0.225, 0.225, 0.225]. Defaults of the torchvision weights: video ResNet-18s [0.22803, 0.22145, 0.216989], mvit_v2_s [0.225, 0.225, 0.225].")

    _urls = field_validator("pretrained")(check_url)

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("name") == "pst_t" and data.get("patch_shift") is None:
            data = {**data, "patch_shift": {}}
        if data.get("depths") is None and data.get("name") in DEFAULT_DEPTHS:
            data = {**data, "depths": DEFAULT_DEPTHS[data["name"]]}
        if data.get("window_size") is None and data.get("name") in DEFAULT_WINDOW:
            data = {**data, "window_size": DEFAULT_WINDOW[data["name"]]}
        for key, value in FAMILY_DEFAULTS.get(data.get("name"), {}).items():
            if data.get(key) is None:
                data = {**data, key: value}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "BackboneConfig":
        if self.reversible and self.activation_checkpointing:
            raise ValueError("activation_checkpointing: cannot be combined with reversible=true (reversible stages already recompute activations)")
        if self.name in VITS:
            if len(self.depths) != 1:
                raise ValueError(f"depths: {self.name} has one stage of blocks, e.g. [{DEFAULT_DEPTHS[self.name][0]}], got {self.depths}")
            if self.chunk_frames % self.patch_size[0]:
                raise ValueError(f"chunk_frames: {self.chunk_frames} is not a multiple of the tubelet size {self.patch_size[0]}")
            if self.adapter is not None and self.adapter.blocks and max(self.adapter.blocks) >= self.depths[0]:
                raise ValueError(f"adapter.blocks: block {max(self.adapter.blocks)} does not exist ({self.depths[0]} blocks)")
        elif self.adapter is not None or self.freeze != "none":
            raise ValueError(f"{'adapter' if self.adapter is not None else 'freeze'}: only vit_* take temporal adapters, not {self.name}")
        if self.freeze != "none":
            if self.reversible:
                raise ValueError("freeze: a frozen pretrained ViT must not be rewired (Re² changes the function); set reversible: false with freeze, or freeze: none")
            if self.adapter is None:
                raise ValueError("freeze: all_but_adapters needs backbone.adapter (nothing else would train)")
        if self.name in TRANSFORMERS:
            if len(self.depths) != len(self.num_heads):
                raise ValueError(f"num_heads: has {len(self.num_heads)} entries but depths has {len(self.depths)}")
            for i, heads in enumerate(self.num_heads):
                if (self.embed_dim * 2**i) % heads:
                    raise ValueError(f"num_heads: stage {i} has {self.embed_dim * 2**i} channels, not divisible by {heads} heads")
        else:
            if len(self.depths) != 4:
                raise ValueError(f"depths: {self.name} has 4 stages (res2-res5), got {len(self.depths)}")
            if self.fusion_kernel is not None and self.fusion_kernel % 2 == 0:
                raise ValueError(f"fusion_kernel: must be odd, got {self.fusion_kernel}")
        if max(self.pixel_mean) > 1 or max(self.pixel_std) > 1:
            raise ValueError(f"pixel_mean / pixel_std: on the 0-1 scale (divide mmaction's 0-255 values by 255), got {list(self.pixel_mean)} / {list(self.pixel_std)}")
        if self.frozen_stages > len(self.depths):
            raise ValueError(f"frozen_stages: {self.frozen_stages} exceeds the {len(self.depths)} stages")
        if self.patch_shift is not None and self.name not in SWIN_FAMILY:
            raise ValueError(f"patch_shift: only swin_t / swin_s / swin_b / pst_t shift patches, not {self.name}")
        if self.name == "pst_t":
            if self.window_size[0] != 1:
                raise ValueError(f"window_size: pst_t attends in 2-D windows of each frame, so the temporal size must be 1 (e.g. [1, 7, 7]), got {list(self.window_size)}")
            if self.patch_shift is not None and self.patch_shift.blocks != "alternate":
                raise ValueError("patch_shift.blocks: pst_t shifts patches in odd blocks and channels in even ones, as its authors; `all` is for swin_t")
        if self.tadaconv and not self.name.startswith("slowfast_"):
            raise ValueError(f"tadaconv: only slowfast_* take TAdaConv in ({self.name}{' has it built in' if self.name == 'tada2d_r50' else ''})")
        return self

    @property
    def temporal_stride(self) -> int:
        """Input frames per output feature step."""
        if self.name in ("tada2d_r50", "mc3_18"):
            return 1
        if self.name in ("r2plus1d_18", "r3d_18"):  # layer2-4 stride 2 in time too
            return 2 ** (len(self.depths) - 1)
        if self.name == "mvit_v2_s":  # its patch embedding
            return 2
        return self.patch_size[0] if self.name in (*SWIN_FAMILY, *VITS) else self.alpha

    @property
    def frame_multiple(self) -> int:
        """What data.num_frames must be a multiple of: the temporal stride, for vit_* chunk_frames."""
        return self.chunk_frames if self.name in VITS else self.temporal_stride

    @property
    def spatial_stride(self) -> int:
        """Input pixels per output feature cell (patch size or stride 4 after the stem (+ max pool or
        TAda2D's strided res2; the video resnets' stem: 2), x 2 per later stage)."""
        first = self.patch_size[1] if self.name in (*SWIN_FAMILY, *VITS) else 2 if self.name in VIDEO_RESNETS else 4
        return first * 2 ** (len(self.depths) - 1)

    @property
    def resolved_fusion_kernel(self) -> int:
        """slowfast_*: fusion_kernel, or pytorchvideo's for this depth when unset."""
        return self.fusion_kernel or (5 if self.name == "slowfast_r101" else 7)


class NmsConfig(Section):
    """Post-processing, as OpenTAD's: candidates per clip, one Soft-NMS per video (+ boundary voting)."""

    pre_nms_topk: PositiveInt = Field(2000, description="Multi-class heads: candidates (point, class) of highest score kept per clip, over all levels. A class-agnostic head's candidates are all its real points (OpenTAD).")
    pre_nms_threshold: NonNegativeFloat = Field(0.001, description="Multi-class heads: candidates not scoring above this are dropped before NMS.")
    sigma: PositiveFloat = Field(0.75, description="Gaussian Soft-NMS sigma: a segment overlapping a kept one by tIoU u has its score multiplied by exp(-u^2 / sigma) (tIoU with 1e-6 added to each length, as OpenTAD's).")
    min_score: NonNegativeFloat = Field(0.001, description="Segments whose score falls below this during Soft-NMS are dropped.")
    min_length: NonNegativeFloat = Field(0.001, description="Decoded segments not longer than this (in grid steps) are dropped before NMS.")
    max_segments: PositiveInt = Field(100, description="Segments kept per video (and per class before that, with per-class NMS).")
    class_agnostic: bool = Field(False, description="One Soft-NMS over all classes instead of one per class.")
    voting_threshold: float = Field(0.0, ge=0.0, le=1.0, description="Boundary voting (OpenTAD's seg_voting): each kept segment becomes the score-weighted mean of the video's candidates overlapping it by tIoU >= this. Applied only with class_agnostic NMS (OpenTAD skips it per class). 0: off.")
    external_scores: str | None = Field(None, description="URL of video-level class scores JSON ({video: {label: score}}) fused as score * class score (needs head.num_classes=1).")
    topk_classes: PositiveInt = Field(2, description="With external_scores: each segment is repeated for this many top-scoring classes of its video.")

    _urls = field_validator("external_scores")(check_url)


class HeadConfig(Section):
    """ActionFormer-style neck and heads, label assignment and losses."""

    num_classes: PositiveInt = Field(description="Action classes (1: class-agnostic, scored by external video-level classes). Required.")
    seq_len: PositiveInt = Field(192, description="Backbone features are resampled to this many time steps.")
    embed_dim: PositiveInt = Field(256, description="Channels of the neck and heads.")
    embed_convs: PositiveInt = Field(2, description="1-D conv layers projecting backbone features.")
    abs_position: bool = Field(True, description="Add a sinusoidal position encoding after the projection (the grid has a fixed length).")
    stem_layers: NonNegativeInt = Field(2, description="Transformer layers at full resolution.")
    fpn_levels: PositiveInt = Field(6, description="Pyramid levels (each halves the temporal length).")
    encoder: Literal["plain", "actionformer"] = Field("plain", description="Transformer blocks of the neck: `plain` pre-norm blocks (linear q / k / v, levels max-pooled between blocks), or `actionformer`, ActionFormer's own (OpenTAD's TransformerBlock + MaskedMHCA: depth-wise conv + LayerNorm before each of q / k / v, strided in the downsampling blocks; LayerScale 1e-4 on both branches when drop_path > 0; position encoding / sqrt(embed_dim)).")
    attn_window: int = Field(7, description="Local self-attention window (odd; -1: global).")
    num_attn_heads: PositiveInt = Field(4, description="Attention heads in the encoder.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout in the encoder.")
    drop_path: float = Field(0.1, ge=0.0, lt=1.0, description="Stochastic depth in the encoder.")
    head_convs: NonNegativeInt = Field(2, description="Conv layers of the classification and regression heads before their output conv.")
    cls_prior_prob: float = Field(0.01, gt=0.0, lt=1.0, description="Initial foreground probability of the classifier (bias init).")
    regression_ranges: list[tuple[NonNegativeFloat, PositiveFloat]] | None = Field(None, description="Per level [low, high] of the larger distance from a point to the boundaries of a segment it may be assigned, in grid steps. Default: [0,4],[4,8],[8,16],...,[2^L,10000].")
    center_sample_radius: PositiveFloat = Field(1.5, description="Center sampling radius (in level strides).")
    reg_loss: Literal["diou", "giou"] = Field("diou", description="1-D IoU loss of the regression head.")
    reg_loss_weight: NonNegativeFloat = Field(1.0, description="Weight of the regression loss.")
    frame_loss_weight: NonNegativeFloat = Field(0.0, description="Weight of an auxiliary per-time-step classification loss (cross-entropy over background + classes, a linear layer on the pooled backbone features). It bootstraps a backbone trained from scratch, which the detection losses alone barely move. 0: off.")
    frame_loss_epochs: PositiveInt | None = Field(None, description="Epochs the frame loss is applied (from the first). Default: all.")
    focal_alpha: float = Field(0.25, ge=0.0, le=1.0, description="Sigmoid focal loss alpha.")
    focal_gamma: NonNegativeFloat = Field(2.0, description="Sigmoid focal loss gamma.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the classification targets.")
    init_loss_norm: PositiveFloat = Field(100.0, description="Initial value of the loss normaliser (an EMA of the number of positive points per batch).")
    loss_norm_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA momentum of the positive count normaliser.")
    nms: NmsConfig = Field(default_factory=NmsConfig, description="Post-processing.")

    @model_validator(mode="before")
    @classmethod
    def _default_ranges(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("regression_ranges") is None:
            levels = data.get("fpn_levels", 6)
            if isinstance(levels, int) and levels > 0:
                ranges = [[0 if i == 0 else 2 ** (i + 1), 2 ** (i + 2)] for i in range(levels)]
                ranges[-1][1] = 1e4
                data = {**data, "regression_ranges": ranges}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "HeadConfig":
        if self.seq_len % 2 ** (self.fpn_levels - 1):
            raise ValueError(f"seq_len: {self.seq_len} is not divisible by 2^(fpn_levels-1) = {2 ** (self.fpn_levels - 1)}")
        if self.regression_ranges is not None and len(self.regression_ranges) != self.fpn_levels:
            raise ValueError(f"regression_ranges: has {len(self.regression_ranges)} entries for {self.fpn_levels} fpn_levels")
        for i, (low, high) in enumerate(self.regression_ranges or []):
            if low > high:
                raise ValueError(f"regression_ranges: level {i} has low {low} > high {high}")
        if self.attn_window != -1 and (self.attn_window < 1 or self.attn_window % 2 == 0):
            raise ValueError(f"attn_window: must be odd and positive or -1, got {self.attn_window}")
        if self.embed_dim % self.num_attn_heads:
            raise ValueError(f"num_attn_heads: {self.num_attn_heads} does not divide embed_dim={self.embed_dim}")
        if self.nms.external_scores is not None and self.num_classes != 1:
            raise ValueError("nms.external_scores: external class scores need a class-agnostic head (num_classes=1)")
        return self


class FinetuneConfig(Section):
    """`re2tal finetune`: action-recognition fine-tuning of the backbone (e.g. Re²TAL's 30 epochs on
    Kinetics-400 after rewiring) with a linear classifier of head.num_classes on the pooled
    features; the other head keys are localization's and unused. Evaluation: top-1 / top-5 of
    one clip (centre crop) per validation clip."""

    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="Dropout before the linear classifier (mmaction's I3DHead for Swin / SlowFast: 0.5).")
    load_classifier: bool = Field(True, description="Start the classifier from the `backbone.pretrained` file's when it has one of head.num_classes x backbone channels (torchvision / pytorchvideo / mmaction Kinetics-400 files on Kinetics-400, or a file written by finetune); else it starts from N(0, 0.01) weights and zero bias, as mmaction's.")
    eval_at_start: bool = Field(True, description="Evaluate once before the first step of a fresh run (logged as top1 / top5 at step 0): what the rewired pretrained model scores before fine-tuning.")
    output: str | None = Field(None, description="Where the fine-tuned backbone file is written at the end (any fsspec URL): the backbone's own layout (the one `backbone.pretrained` loads as it is) plus its classifier, so a localization config loads it directly. Default: `<train.storage_path>/<train.name>/backbone.pth`.")

    _urls = field_validator("output")(check_url)


class InferenceConfig(Section):
    """`re2tal predict` / `extract` / `eval`: the Ray Data job's model actors. Decoding runs in
    read tasks, one CPU each, on whatever CPUs the actors leave free."""

    actors: PositiveInt | None = Field(None, description="Model actors (`map_batches` actor pool). Default: one per GPU of the cluster with use_gpu, else 1.")
    use_gpu: bool = Field(False, description="One GPU per actor; false: the actors run on CPUs (cpus_per_actor each).")
    cpus_per_actor: PositiveFloat = Field(1.0, description="CPUs reserved per actor; a CPU actor runs torch on that many threads (at least 1).")
    batch_size: PositiveInt | None = Field(None, description="Clips per model call. Default: predict / eval data.batch_size (a clip is a window of data.num_frames), extract 32 (a clip is extract.clip_frames).")


class ExtractConfig(Section):
    """`re2tal extract`: clips of every video through the backbone, pooled to one feature vector
    per clip. Clip k holds the frames k * clip_stride + j * frame_interval (j < clip_frames) of the
    video's frame grid (its own frames, or frames resampled at `fps`); only whole clips (a video
    shorter than one clip gives one, its last frame repeated). Frames are decoded at
    data.short_side and centre-cropped to data.frame_size, as in evaluation. TAdaConv's
    localization features: clip_frames 8, clip_stride 16, data.short_side 128."""

    clip_frames: PositiveInt = Field(8, description="Frames per clip.")
    clip_stride: PositiveInt = Field(16, description="Frames of the grid between the starts of consecutive clips (the feature stride).")
    frame_interval: PositiveInt = Field(1, description="Frames of the grid between consecutive frames of a clip.")
    fps: PositiveFloat | None = Field(None, description="Resample every video to this frame rate first (frame m of the grid is the frame on screen at (m + 0.5) / fps), so that a clip spans the same time in every video. None: the video's own frames.")


# --------------------------------------------------------------------------------------------
# optimisation, distributed training


class OptimConfig(Section):
    """AdamW (or SGD with momentum) with separate backbone / head learning rates, linear warmup
    then cosine decay."""

    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="`adamw` (torch's AdamW, betas below), or `sgd`: torch's SGD with `momentum` (mmaction's SlowFast Kinetics recipe).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd: momentum.")
    backbone_lr: NonNegativeFloat = Field(1e-5, description="Learning rate of the backbone parameters.")
    head_lr: PositiveFloat = Field(1e-4, description="Learning rate of the neck / head parameters.")
    weight_decay: NonNegativeFloat = Field(0.05, description="AdamW weight decay (not applied to norms, biases and position-bias tables, unless backbone_decay_all).")
    backbone_decay_all: bool = Field(False, description="Apply weight_decay to every backbone parameter, norms, biases and position tables included (OpenTAD's backbone group).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_epochs: NonNegativeFloat = Field(5.0, description="Linear warmup length in epochs.")
    warmup_from_zero: bool = Field(False, description="Warm up as OpenTAD's LinearWarmupCosineAnnealingLR: step s of W warmup steps at s / (W - 1) of the peak lr (the first step at 0). False: (s + 1) / W.")
    cosine_epochs: PositiveFloat | None = Field(None, description="Length of the warmup + cosine schedule in epochs, which may exceed train.epochs (OpenTAD's max_epoch; its THUMOS runs decay over 1500 epochs and stop at 120). Default: train.epochs.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine schedule floor as a fraction of the peak lr.")
    ema: bool = Field(False, description="Keep an exponential moving average of the weights for evaluation.")
    ema_decay: float = Field(0.999, gt=0.0, lt=1.0, description="EMA decay per step.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class TrainConfig(Section):
    """The training run: Ray Train workers, length, evaluation, checkpoints, restarts."""

    name: str = Field("re2tal", description="Run name. Re-running the same name resumes from its last checkpoint.")
    storage_path: str = Field("runs", description="Where checkpoints and results go (local dir or s3://...).")
    epochs: PositiveInt = Field(15, description="Training epochs.")
    num_workers: NonNegativeInt = Field(2, description="Ray Train workers (0: in-process local mode for debugging).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: PositiveFloat = Field(1.0, description="CPUs reserved per worker.")
    eval_every_epochs: PositiveInt = Field(1, description="Evaluate on the validation subset every k epochs (and after the last).")
    eval_start_epoch: NonNegativeInt = Field(0, description="No evaluation before this epoch, counted from 0 (OpenTAD's val_start_epoch): "
                                             "epoch e is evaluated when e >= this and (e + 1) is a multiple of eval_every_epochs; "
                                             "the last epoch always is.")
    report_every_steps: PositiveInt = Field(10, description="Log training metrics (losses averaged over the k steps, learning "
                                            "rates, clips/s, peak memory) to MLflow every k optimizer steps, in the background. "
                                            "Ray Train (and Tune) get a report only at evaluations and checkpoints.")
    seed: int = Field(0, description="Seed of model init, sampling and augmentation.")
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint before the run fails (-1: unlimited).")
    keep_checkpoints: PositiveInt = Field(2, description="Checkpoints kept in storage_path.")
    checkpoint_every_steps: PositiveInt | None = Field(None, description="Also checkpoint every k optimizer steps inside an epoch (long epochs). Default: at epoch ends only.")
    node_wait_s: PositiveFloat = Field(600.0, description="How long the workers may wait for the resources they need (at launch, and after a lost node for a replacement, e.g. from an autoscaler) before the run fails; its last checkpoint is kept.")
    tiou_thresholds: str = Field("0.5:0.95:0.05", description="tIoU thresholds of evaluation: start:stop:step or a comma list (ActivityNet 0.5:0.95:0.05, THUMOS 0.3:0.7:0.1).")

    _urls = field_validator("storage_path")(check_url)

    @field_validator("tiou_thresholds")
    @classmethod
    def _thresholds(cls, v: str) -> str:
        from re2tal.evaluation.metrics import parse_thresholds

        try:
            parse_thresholds(v)
        except BadInput as err:
            raise ValueError(str(err).removeprefix("--tiou: ")) from None
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not RUN_NAME.match(v):
            raise ValueError(f"{v!r} must be letters, digits, '_', '.', '-' (it names directories)")
        return v

    def evaluates(self, epoch: int) -> bool:
        """Whether the run evaluates after `epoch` (counted from 0)."""
        return epoch == self.epochs - 1 or (epoch >= self.eval_start_epoch and (epoch + 1) % self.eval_every_epochs == 0)


class DeepSpeedConfig(Section):
    """The DeepSpeed engine of each worker."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage (0-3).")
    precision: Literal["fp32", "bf16", "fp16"] = Field("bf16", description="Training precision (fp16 needs a GPU).")
    gradient_accumulation_steps: PositiveInt = Field(1, description="Micro-batches per optimizer step.")
    gradient_clipping: NonNegativeFloat = Field(1.0, description="Global gradient-norm clip (0: off).")
    offload_optimizer: bool = Field(False, description="ZeRO offload of optimizer states to CPU memory.")


# --------------------------------------------------------------------------------------------
# sweeps and tracking


class SearchDim(Section):
    """One dimension of a search space: exactly one of the five forms."""

    choice: list[Any] | None = Field(None, description="Pick one of these values (search: grid enumerates them all).")
    grid: list[Any] | None = Field(None, description="Every one of these values, crossed with the other grid keys and the cases.")
    uniform: tuple[float, float] | None = Field(None, description="Uniform float in [low, high].")
    loguniform: tuple[PositiveFloat, PositiveFloat] | None = Field(None, description="Log-uniform float in [low, high].")
    randint: tuple[int, int] | None = Field(None, description="Integer in [low, high).")

    @model_validator(mode="after")
    def _one(self) -> "SearchDim":
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice / grid / uniform / loguniform / randint, got {given or 'none'}")
        values = self.choice if self.choice is not None else self.grid
        if values is not None and not values:
            raise ValueError(f"{given[0]}: needs at least one value")
        return self

    def bounds(self) -> list[Any]:
        """Values at the edges of the dimension (validated against the config at load)."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice if self.choice is not None else self.grid)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        return list(self.uniform or self.loguniform)

    @property
    def enumerable(self) -> bool:
        return self.choice is not None or self.grid is not None


CASE_NAME = "name"  # the key of a tune.cases entry that labels it rather than setting a config key


class TuneConfig(Section):
    """Ray Tune sweep over config keys (augmentations, backbone choices, learning rates).

    The trials are the grid keys crossed with the cases (or one point if neither is given), each
    repeated `num_samples` times with fresh draws of the sampled keys, as Ray Tune's
    BasicVariantGenerator does; with `search: optuna` Optuna proposes `num_samples` trials."""

    name: str = Field("re2tal-tune", description="Sweep name (re-running the same name resumes it, under the same MLflow parent run).")
    search: Literal["random", "grid", "optuna"] = Field("random", description="How trials are chosen: `random` samples choice / uniform / loguniform / randint keys and enumerates grid keys and cases; `grid` also enumerates choice keys (only enumerable keys allowed); `optuna` lets Optuna's TPE sampler propose values (through Ray Tune's OptunaSearch; no grid keys or cases).")
    num_samples: PositiveInt = Field(8, description="Ray Tune's num_samples: random / grid search run every grid point x case this many times (1 for a plain grid); optuna runs this many trials.")
    metric: str = Field("average_mAP", description="Metric to optimise.")
    mode: Literal["max", "min"] = Field("max", description="Maximise or minimise the metric.")
    scheduler: Literal["fifo", "asha"] = Field("asha", description="Trial scheduler (asha stops weak trials early).")
    grace_period_epochs: PositiveInt = Field(1, description="asha: epochs before a trial may be stopped.")
    max_concurrent_trials: PositiveInt = Field(1, description="Trials run at the same time.")
    memory_budget_gb: PositiveFloat | None = Field(None, description="Per-worker peak memory limit (GB = 2^30 bytes; CUDA: max allocated, CPU: peak RSS): a trial that reports more is stopped and recorded `infeasible`. None: no limit.")
    space: dict[str, SearchDim] = Field(default_factory=dict, description="Dotted config key -> search dimension, e.g. `augment.hflip: {grid: [true, false]}`.")
    cases: list[dict[str, Any]] = Field(default_factory=list, description=f"Explicit trials, each a mapping of dotted config keys to values (an optional `{CASE_NAME}` labels it in the summary), crossed with the grid keys; e.g. the rows of an ablation table.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return TrainConfig._name(v)

    @model_validator(mode="after")
    def _search_fits(self) -> "TuneConfig":
        if self.search == "grid":
            for key, dim in self.space.items():
                if not dim.enumerable:
                    raise ValueError(f"space.{key}: search: grid can only enumerate choice / grid values")
        if self.search == "optuna":
            for key, dim in self.space.items():
                if dim.grid is not None:
                    raise ValueError(f"space.{key}: search: optuna proposes values itself; use choice instead of grid")
            if self.cases:
                raise ValueError("cases: search: optuna proposes values itself; explicit cases need search: random or grid")
        for i, case in enumerate(self.cases):
            name = case.get(CASE_NAME)
            if name is not None and not isinstance(name, str):
                raise ValueError(f"cases.{i}.{CASE_NAME}: must be text, got {name!r}")
            if not any(k != CASE_NAME for k in case):
                raise ValueError(f"cases.{i}: sets no config key")
            both = sorted(set(case) & set(self.space))
            if both:
                raise ValueError(f"cases.{i}: {both[0]} is also a key of tune.space")
        names = [c[CASE_NAME] for c in self.cases if c.get(CASE_NAME) is not None]
        if len(names) != len(set(names)):
            raise ValueError(f"cases: case names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
        return self

    def case_label(self, index: int) -> str:
        """A case's name, or its overrides as `key=value` text."""
        case = self.cases[index]
        if case.get(CASE_NAME):
            return case[CASE_NAME]
        return " ".join(f"{k}={v}" for k, v in case.items() if k != CASE_NAME)


class TrackingConfig(Section):
    """MLflow tracking of every run (from rank 0)."""

    enabled: bool = Field(True, description="Log the run to MLflow.")
    tracking_uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI (sqlite:///file.db or http(s)://server).")
    experiment: str = Field("re2tal", description="MLflow experiment name.")
    timeline_videos: NonNegativeInt = Field(4, description="Validation videos drawn in the detection timeline plot.")
    system_metrics: bool = Field(True, description="Log MLflow's system metrics (`system/...`: CPU, memory, disk, network; GPU utilisation and memory where a GPU and pynvml are present) of every node of a training run, sampled by its first worker.")
    system_metrics_interval_s: PositiveFloat = Field(10.0, description="Seconds between system-metric samples.")
    register_model: str | None = Field(None, description="Register the model a finished run logs (MLflow model `model` of the run) as a new version of this registered model. Default: logged, not registered.")
    retry_s: NonNegativeFloat = Field(600.0, description="How long records the tracking server did not take (down, restarting, "
                                      "unreachable) are retried at the end of a run before it ends without them. Training never "
                                      "waits for the server: records are sent in the background and retried every few seconds; "
                                      "metrics still unsent at a checkpoint are kept in it and sent by a resumed run.")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme in ("", "file"):
            raise ValueError(f"{v!r} is the plain file store, which MLflow 3 refuses; use sqlite:///mlflow.db or an http(s):// tracking server")
        if scheme not in ("sqlite", "http", "https", "postgresql", "mysql", "databricks"):
            raise ValueError(f"unsupported tracking URI scheme {scheme!r}")
        return v


# --------------------------------------------------------------------------------------------
# the tree


class Config(Section):
    """The whole resolved config of a run."""

    data: DataConfig
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _across_sections(self) -> "Config":
        d, b = self.data, self.backbone
        if d.num_frames % b.frame_multiple:
            what = "chunk_frames" if b.name in VITS else "temporal stride"
            raise ValueError(f"data.num_frames: {d.num_frames} is not divisible by the backbone's {what} {b.frame_multiple} ({b.name})")
        if d.frame_size % b.spatial_stride:
            raise ValueError(f"data.frame_size: {d.frame_size} is not divisible by {b.spatial_stride}, the spatial stride of {b.name}")
        if self.deepspeed.precision == "fp16" and not self.train.use_gpu:
            raise ValueError("deepspeed.precision: fp16 needs a GPU (train.use_gpu=true); use bf16 or fp32 on CPU")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs zero_stage >= 1")
        if d.synth is not None and d.synth.classes + clip_annotations(d.annotations) != self.head.num_classes:
            what = f"{d.synth.classes} classes" + (" + background (clips)" if clip_annotations(d.annotations) else "")
            raise ValueError(f"head.num_classes: {self.head.num_classes} but the synthetic dataset (data.synth.classes) has {what}")
        if self.train.num_workers == 0 and self.train.use_gpu:
            raise ValueError("train.use_gpu: the in-process local mode (num_workers=0) runs on CPU")
        return self

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, secrets kept (for re-validation in this process, never for logging)."""
        return _reveal(self.model_dump(mode="python"))

    def to_yaml(self) -> str:
        """The resolved config as YAML, secrets masked (this is what is logged with a run)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flattened `section.key` -> value, secrets left out (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, model: BaseModel) -> None:
            for name in type(model).model_fields:
                value = getattr(model, name)
                key = f"{prefix}{name}"
                if isinstance(value, SecretStr):
                    continue
                if isinstance(value, BaseModel):
                    walk(key + ".", value)
                elif isinstance(value, dict):
                    for k, v in value.items():
                        out[f"{key}.{k}"] = v.model_dump(exclude_none=True) if isinstance(v, BaseModel) else v
                else:
                    out[key] = list(value) if isinstance(value, tuple) else value

        walk("", self)
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A new, validated config with dotted keys replaced (tune trials, CLI --set). A new
        `backbone.name` takes its own family's sizes (depths, heads, windows, ...) where this
        config holds the old family's defaults, as if the name had been set in the file."""
        tree = self.to_dict()
        name = overrides.get("backbone.name", self.backbone.name)
        if name != self.backbone.name:
            old = BackboneConfig(name=self.backbone.name).model_dump(mode="python")
            for key in FAMILY_KEYS:
                if f"backbone.{key}" not in overrides and tree["backbone"].get(key) == old[key]:
                    del tree["backbone"][key]
        return validate(apply_overrides(tree, overrides))


def _reveal(obj: Any) -> Any:
    if isinstance(obj, SecretStr):
        return obj.get_secret_value()
    if isinstance(obj, dict):
        return {k: _reveal(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_reveal(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# loading


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value parsed as YAML: 3, 1e-4, true, [1, 2], null, text)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise BadInput(f"--set {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise BadInput(f"--set {key}: cannot parse value {raw!r} ({err.__class__.__name__})") from None
    if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 1e-4 as a string
        value = float(value)
    return key, value


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (a copy), creating sections that are absent."""
    out = _copy(tree)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise BadInput(f"{'.'.join(parts[: i + 1])}: is a value, not a section, so {dotted} cannot be set")
            node = child
        node[parts[-1]] = value
    return out


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    return obj


def format_error(err: ValidationError) -> str:
    """One line naming each offending key.

    Validators name the key they reject as "key: problem", relative to the section they check
    (the top-level validator uses full dotted keys); that key is joined onto the location."""
    parts = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            key, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.]*", key):
                loc, msg = loc + [key], rest
        elif not isinstance(e.get("input"), (dict, list)):
            msg = f"{msg}, got {e.get('input')!r}"
        parts.append(f"{'.'.join(loc) or 'config'}: {msg}")
    return "; ".join(parts)


def validate(tree: Any) -> Config:
    if not isinstance(tree, dict):
        raise BadInput(f"config: expected a mapping of sections, got {type(tree).__name__}")
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise BadInput(format_error(err)) from None
    _check_space(cfg)
    return cfg


def _check_space(cfg: Config) -> None:
    """Every swept key exists and every edge of its range, and every case, gives a valid config."""
    base = apply_overrides(cfg.to_dict(), {"tune.space": {}, "tune.cases": []})
    for key, dim in cfg.tune.space.items():
        _check_sweepable(key, f"tune.space.{key}")
        for value in dim.bounds():
            try:
                Config.model_validate(apply_overrides(base, {key: value}))
            except ValidationError as err:
                raise BadInput(f"tune.space.{key}: value {value!r} is invalid ({format_error(err)})") from None
    for i, case in enumerate(cfg.tune.cases):
        overrides = {k: v for k, v in case.items() if k != CASE_NAME}
        for key in overrides:
            _check_sweepable(key, f"tune.cases.{i}.{key}")
        try:
            Config.model_validate(apply_overrides(base, overrides))
        except ValidationError as err:
            raise BadInput(f"tune.cases.{i}: gives an invalid config ({format_error(err)})") from None
        except BadInput as err:
            raise BadInput(f"tune.cases.{i}: {err}") from None


def _check_sweepable(key: str, where: str) -> None:
    if key.startswith("tune.") or key == "train.name" or not _is_field(Config, key.split(".")):
        raise BadInput(f"{where}: not a config key that a sweep can set")


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model type of a section field (`Model` or `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = getattr(annotation, "__args__", ())
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in args else None


def _is_field(model: type[BaseModel], parts: Sequence[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    sub = _section_type(field.annotation)
    return sub is not None and _is_field(sub, parts[1:])


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise BadInput(f"{path}: cannot read config ({err.strerror or err})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', None) or err.__class__.__name__})") from None
    tree = tree if tree is not None else {}
    if not isinstance(tree, dict):
        raise BadInput(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    return validate(apply_overrides(tree, dict(parse_override(o) for o in overrides)))


# --------------------------------------------------------------------------------------------
# reference documentation


def reference_markdown() -> str:
    """The config reference (README), generated from the schema so it cannot drift."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for name, field in model.model_fields.items():
            key = prefix + name
            sub = _section_type(field.annotation)
            if sub is not None:
                lines.append(f"| **{key}** | section | | {field.description or sub.__doc__.splitlines()[0]} |")
                walk(key + ".", sub)
                continue
            default = "required" if field.is_required() else f"`{_short(field.get_default(call_default_factory=True))}`"
            lines.append(f"| {key} | {_type_name(field.annotation)} | {default} | {field.description or ''} |")

    walk("", Config)
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float):
        value = round(value, 4)
    if isinstance(value, list):
        value = [round(v, 4) if isinstance(v, float) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__origin__", None) is Literal:
        return " \\| ".join(str(v) for v in annotation.__args__)
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "").replace("pydantic.types.SecretStr", "secret").replace("NoneType", "None")
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    return text.replace("|", "\\|")
