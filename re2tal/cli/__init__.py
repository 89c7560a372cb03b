"""The `re2tal` command: the only module that knows every task (re2tal.tasks) and the sweeps
(re2tal.tuning).

A small, fixed CLI: everything else is a config key (`--set section.key=value`). Handlers
(re2tal.cli.commands and the tools' own modules) are imported only when their subcommand runs, so
`re2tal --help` stays fast. Exit codes: 0 ok, 2 bad input (one line naming what is wrong), 1
anything else.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from re2tal.config import load_config
from re2tal.errors import BadInput

# subcommand -> "module:function" taking the parsed args and returning an exit code
HANDLERS: dict[str, str] = {
    "train": "re2tal.cli.commands:train",
    "finetune": "re2tal.cli.commands:finetune",
    "tune": "re2tal.cli.commands:tune",
    "eval": "re2tal.cli.commands:evaluate",
    "predict": "re2tal.cli.commands:predict",
    "extract": "re2tal.cli.commands:extract",
    "plan": "re2tal.cli.commands:plan",
    "map": "re2tal.evaluation.cli:map_command",
    "data synth": "re2tal.data.synth:main",
    "data inspect": "re2tal.data.video:inspect_command",
    "data prepare": "re2tal.raydata.prepare:main",
    "bench memory": "re2tal.bench.model:memory_main",
    "bench speed": "re2tal.bench.model:speed_main",
    "bench loader": "re2tal.bench.loader:main",
    "bench predict": "re2tal.bench.predict:main",
    "bench map": "re2tal.bench.map:main",
    "bench tadaconv": "re2tal.bench.tadaconv:main",
    "bench all": "re2tal.bench.all:main",
    "bench gpu": "re2tal.bench.gpu:main",
    "bench reports": "re2tal.bench.reports:main",
}


# subcommand -> its flags that name local paths, made absolute like the config's (see _base_dir_arg)
PATH_FLAGS = {"eval": ("checkpoint", "json", "predictions"), "predict": ("model", "videos", "out"), "extract": ("videos", "out"),
              "plan": ("json",),
              "data prepare": ("annotations", "out", "video_root")}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="YAML", help="config file (see configs/ and the README's config reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 --set backbone.reversible=false (repeatable)")
    _base_dir_arg(p)


def _base_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-dir", metavar="DIR", help="relative local paths (in the config and in path flags) are relative to "
                   "DIR (default: the current directory); a `ray job submit` job passes the directory it is submitted from: "
                   "--base-dir $PWD")


def _verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="also show Ray's, DeepSpeed's and MLflow's own log lines (and Tune's status tables)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="re2tal",
        description="End-to-end temporal action localization on long videos with reversible backbones (Re²TAL).",
        epilog="Exit codes: 0 ok, 2 bad input (config, file, URL), 1 other failure.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (Ray Train + DeepSpeed; local Ray if no cluster)",
                       description="Train end to end from raw frames. Re-running with the same train.name resumes from its last checkpoint.")
    _config_args(p)
    p.add_argument("--local", action="store_true", help="run in-process (Ray Train local mode, num_workers=0) so a debugger works")
    _verbose_arg(p)

    p = sub.add_parser("finetune", help="fine-tune a backbone for action recognition on clips (Kinetics-style; Ray Train + DeepSpeed)",
                       description="Action-recognition fine-tuning of the backbone (reversible or not) with a linear classifier on a CSV of "
                                   "clips (Kinetics' layout accepted): top-1 / top-5 on the validation clips, checkpoints, MLflow. At the end "
                                   "it writes a backbone file that backbone.pretrained of a localization config loads. Re-running with the "
                                   "same train.name resumes from its last checkpoint.")
    _config_args(p)
    p.add_argument("--local", action="store_true", help="run in-process (Ray Train local mode, num_workers=0) so a debugger works")
    _verbose_arg(p)

    p = sub.add_parser("tune", help="sweep config keys with Ray Tune (tune.space in the config)",
                       description="Run a Ray Tune sweep of training runs over the config's tune section (space, cases, search). "
                                   "Re-running the same tune.name resumes it under the same MLflow parent run.")
    _config_args(p)
    _verbose_arg(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation subset (mAP)",
                       description="Predict the validation subset with a checkpoint (the Ray Data job of re2tal predict; local Ray "
                                   "if no cluster) and compute mAP at the configured tIoU thresholds.")
    _config_args(p)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    p.add_argument("--json", metavar="OUT", help="also write the metrics as JSON to OUT")
    p.add_argument("--predictions", metavar="OUT", help="write the ActivityNet-format predictions to OUT (per-video parts to "
                   "OUT.parts/: a rerun predicts only what is missing)")

    p = sub.add_parser("predict", help="detect action segments in every video of a collection (Ray Data job)",
                       description="Run a trained model over a video, every video under a prefix, or the videos of an annotation "
                                   "file, as a Ray Data job (local Ray if no cluster): decoding in read tasks on any node's CPUs, the "
                                   "model in an actor pool (inference.* keys), the evaluation's windows. Writes an ActivityNet "
                                   "submission to OUT and one result per video to OUT.parts/; run again, it predicts only the "
                                   "videos without a result. Unreadable videos are listed and skipped.")
    p.add_argument("--model", required=True, metavar="M", help="checkpoint directory written by re2tal train (local or s3://); "
                   "its config.yaml is the model's config")
    p.add_argument("--videos", required=True, metavar="V", help="a video URL, a prefix (every video file under it, e.g. "
                   "s3://bucket/videos/) or an ActivityNet-format annotation file (*.json: the videos of --subset)")
    p.add_argument("--out", required=True, metavar="OUT", help="the submission JSON to write (local or s3://)")
    p.add_argument("--subset", help="with an annotation file: which subset (default: the model's data.val_subset)")
    p.add_argument("--config", metavar="YAML", help="the model's config, instead of the checkpoint's config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the model's config, e.g. --set inference.actors=4 (repeatable)")
    _base_dir_arg(p)

    p = sub.add_parser("extract", help="clip features of every video by a backbone, for feature-based heads (Ray Data job)",
                       description="Run the config's backbone (backbone.pretrained: any weights file, e.g. one re2tal finetune "
                                   "wrote) over clips of every video (extract.* keys) as a Ray Data job (local Ray if no cluster) "
                                   "and write DIR/<video_id>.npy, float16 (clips, channels), and DIR/features.json. Run again, it "
                                   "extracts only the videos without features. Unreadable videos are listed and skipped.")
    _config_args(p)
    p.add_argument("--videos", metavar="V", help="a video URL, a prefix (every video file under it) or an annotation file "
                   "(default: data.annotations, all subsets)")
    p.add_argument("--subset", help="with an annotation file: only this subset (default: all)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (local or s3://)")

    p = sub.add_parser("plan", help="predict the per-worker peak memory of a training step (no GPU needed)",
                       description="Predict, without a GPU, the peak device memory of one training step per worker for the config "
                                   "(parameters, gradients, optimizer states under ZeRO, activations, backward transient, input), "
                                   "for the standard, checkpointed and reversible backbone side by side, and the largest "
                                   "data.num_frames that fits. Device: CUDA when train.use_gpu, else CPU.")
    _config_args(p)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0, metavar="G", help="memory of one GPU in GB = 2^30 bytes (default 80)")
    p.add_argument("--json", metavar="OUT", help="also write the plan as JSON to OUT")

    p = sub.add_parser("map", help="mAP of predictions against ground truth (ActivityNet protocol)",
                       description="Mean average precision at tIoU thresholds, following the ActivityNet detection protocol.")
    p.add_argument("--ground-truth", required=True, metavar="GT", help="ActivityNet-format annotations JSON")
    p.add_argument("--predictions", required=True, metavar="PRED", help="ActivityNet submission-format predictions JSON")
    p.add_argument("--subset", default="validation", help="ground-truth subset to evaluate (default: validation)")
    p.add_argument("--tiou", default="0.5:0.95:0.05", help="thresholds as start:stop:step or a comma list (default: 0.5:0.95:0.05; THUMOS: 0.3:0.7:0.1)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")

    data = sub.add_parser("data", help="datasets: generate the synthetic set, inspect videos, prepare videos for training").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("synth", help="write a synthetic TAL dataset (real mp4 files + annotations)",
                        description="Write synthetic long videos whose actions are visible motion patterns, with ActivityNet-format annotations, to any fsspec URL.")
    p.add_argument("--out", required=True, metavar="URL", help="destination folder (local dir or s3://bucket/prefix)")
    p.add_argument("--videos", type=int, default=48, help="number of videos (default 48)")
    p.add_argument("--val-videos", type=int, default=12, help="of which in the validation subset (default 12)")
    p.add_argument("--classes", type=int, default=4, help="number of action classes (default 4)")
    p.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds per video (default 60)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate (default 10)")
    p.add_argument("--size", type=int, default=64, help="frame height and width (default 64)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--clips", action="store_true", help="also write clips.csv: a recognition set cut from the videos (each action a clip "
                   "of its class, the longest gap of each video a background clip) for `re2tal finetune`")
    p = data.add_parser("inspect", help="frames, fps, duration and size of a video",
                        description="Open a video through fsspec + decord and print its frames, fps, duration, height and width.")
    p.add_argument("url", help="video URL (s3://, gs://, http(s)://, file:// or path)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = data.add_parser("prepare", help="transcode every video of an annotation file to the training size and fps (Ray Data job)",
                        description="Transcode every video of an annotation file once, on all CPUs of the Ray cluster (local Ray "
                                    "if none), to h264 at the training short side and frame rate with a short keyframe interval, "
                                    "into OUT/videos/, and write OUT/annotations.json pointing at the copies (durations and "
                                    "segments unchanged) and OUT/prepare.json. Videos already prepared are skipped; those that "
                                    "cannot be read are listed and left out. Storage credentials and endpoint: the standard AWS "
                                    "environment.")
    p.add_argument("--annotations", required=True, metavar="URL", help="ActivityNet-format annotation file of the source videos")
    p.add_argument("--out", required=True, metavar="URL", help="output folder (local dir, s3://bucket/prefix, gs://...)")
    p.add_argument("--short-side", type=int, default=256, metavar="PX", help="short side of the prepared frames (default 256)")
    p.add_argument("--fps", type=float, default=15.0, help="frame rate of the prepared videos (default 15)")
    p.add_argument("--gop", type=int, metavar="N", help="frames between keyframes (default: one second of frames)")
    p.add_argument("--crf", type=int, default=23, help="x264 quality, lower is better (default 23, x264's own default)")
    p.add_argument("--video-root", metavar="URL", help="source videos are <video-root>/<prefix><id>.<ext> (default: each "
                                                       "video's url in the annotations, else next to the annotation file)")
    p.add_argument("--video-prefix", default="", metavar="P", help="with --video-root: file-name prefix (ActivityNet: v_)")
    p.add_argument("--video-ext", default="mp4", metavar="EXT", help="with --video-root: file extension (default mp4)")
    _base_dir_arg(p)

    bench = sub.add_parser("bench", help="benchmarks writing JSON: memory, speed, loader, predict, map, tadaconv, reports, gpu").add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, what in (("memory", "activation bytes and peak memory"), ("speed", "forward+backward step time")):
        p = bench.add_parser(name, help=f"{what}: standard vs checkpointing vs reversible",
                             description=f"{what.capitalize()} of a synthetic residual stage or a backbone, in three modes: standard (plain autograd), checkpoint (per-block activation checkpointing), reversible.")
        p.add_argument("--backbone", metavar="NAME", help="a backbone (swin_t, swin_s, swin_b, pst_t, slowfast_r50, slowfast_r101, tada2d_r50, r2plus1d_18, r3d_18, mc3_18, mvit_v2_s, vit_s, vit_b, vit_l, vit_h, vit_g) instead of a synthetic stage")
        p.add_argument("--stage-blocks", type=int, default=12, metavar="N", help="synthetic stage: residual functions (default 12)")
        p.add_argument("--width", type=int, default=96, metavar="C", help="synthetic stage: channels (default 96)")
        p.add_argument("--frames", default="32", metavar="T[,T...]", help="input frames, or a comma list of frame counts to run each (default 32)")
        p.add_argument("--size", type=int, default=112, metavar="S", help="input height and width (default 112)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision of the forward (default fp32; fp16 needs cuda)")
        p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads, default 2)")
        p.add_argument("--modes", default="standard,checkpoint,reversible",
                       help="comma list of modes to run: standard, checkpoint, reversible, reversible_lowp (streams in the compute precision)")
        p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p = bench.add_parser("loader", help="frames/s from local files vs S3 (moto), cold and warm cache; --real: decode cost at 360p / 720p",
                         description="Loader throughput for a sampling config from local files and from an S3 endpoint (moto server on loopback), with cold and warm cache, and bytes fetched per epoch. "
                                     "With --real: decode cost of 2-minute 360p and 720p videos (made once under .cache/bench-videos), raw and prepared "
                                     "(re2tal data prepare), per core, with data.loader_threads 1..cores and with the ray_data loader on the local cores.")
    p.add_argument("--real", action="store_true", help="real-resolution decode costs instead (starts a local Ray: several minutes)")
    p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p = bench.add_parser("predict", help="videos/s of predict and extract with 1 and 2 CPU actors; how long the actors wait for decoding",
                         description="Run the re2tal predict and re2tal extract jobs on the synthetic set (debug model, random weights) "
                                     "on a local Ray with 1 and 2 CPU model actors: videos/s, the share of the actors' time spent "
                                     "waiting for decoded input, decode and model seconds per video (a few minutes).")
    p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p = bench.add_parser("map", help="time of an ActivityNet-size mAP evaluation",
                         description="Time `re2tal map` on an ActivityNet-size problem (about 5,000 videos x 100 predictions, 200 classes, 10 thresholds).")
    p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p.add_argument("--videos", type=int, default=5000, metavar="N", help="videos in the problem, 100 predictions each (default 5000, ActivityNet validation size)")
    p = bench.add_parser("tadaconv", help="one TAdaConv2d layer vs the plain conv vs the official grouped conv",
                         description="Forward+backward time, kept activations and peak memory of a TAdaConv2d (3x3, cal_dim cin) against the plain conv and the official grouped-conv formulation, at TAda2D's res2 and res5 shapes (B*T = 64), with a self-check of outputs and gradients against the official formulation.")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads, default 2)")
    p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p = bench.add_parser("gpu", help="every check that needs a GPU, in one command (< 8 min on an H100 / H200)",
                         description="On one CUDA GPU: Swin-T vs torchvision and reversible vs plain gradients (fp32, bf16 with and "
                                     "without fp32 streams), peak memory and step time of standard / checkpoint / reversible swin_t and "
                                     "slowfast_r101 at 96-768 frames next to re2tal plan's prediction, and 20 steps of the debug config "
                                     "on the GPU. Writes DIR/gpu.json and DIR/gpu_memory.png; exit 2 without a GPU.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cuda (default), or cpu: a dry run of the same checks at tiny sizes, in seconds")
    p = bench.add_parser("reports", help="step time of the debug config logging metrics every step vs never",
                         description="Train one epoch of the debug config (2 Ray Train workers on CPU) with training metrics logged every "
                                     "optimizer step and never, alternating, and compare the step times (several minutes).")
    p.add_argument("--repeats", type=int, default=1, help="runs of each (default 1)")
    p.add_argument("--json", required=True, metavar="OUT", help="write results to OUT")
    p = bench.add_parser("all", help="run every benchmark into a folder")
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    return parser


def _handler(key: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = HANDLERS[key].partition(":")
    return getattr(importlib.import_module(module), func)


def _resolve_paths(args: argparse.Namespace, key: str) -> None:
    """Relative local paths of the config and of the command's path flags made absolute against
    --base-dir or the current directory (re2tal.training.paths: Ray Train workers run elsewhere,
    and a Ray job in a temporary copy of its working directory)."""
    from re2tal.training.paths import absolute_paths, resolve

    base = getattr(args, "base_dir", None)
    if hasattr(args, "cfg"):
        args.cfg = absolute_paths(args.cfg, base)
    for flag in PATH_FLAGS.get(key, ()):
        if getattr(args, flag, None):
            setattr(args, flag, resolve(getattr(args, flag), f"--{flag.replace('_', '-')}", base))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = " ".join(k for k in (args.command, getattr(args, "data_command", None), getattr(args, "bench_command", None)) if k)
    if not getattr(args, "verbose", False):  # libraries' notes about themselves stay off the terminal
        from re2tal import console

        console.quiet_driver()
    try:
        if getattr(args, "config", None):  # validate before anything starts
            args.cfg = load_config(args.config, args.overrides)
        _resolve_paths(args, key)
        return int(_handler(key)(args) or 0)
    except BadInput as err:
        print(f"re2tal {key}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"re2tal {key}: interrupted", file=sys.stderr)
        return 130
