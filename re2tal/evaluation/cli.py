"""`re2tal map`: mAP of an ActivityNet-format prediction file against ground truth."""

from __future__ import annotations

import argparse
import json
from typing import Any

import fsspec

from re2tal.errors import BadInput
from re2tal.evaluation.formats import parse_ground_truth, parse_predictions
from re2tal.evaluation.metrics import evaluate_detection, parse_thresholds


def read_json(url: str) -> Any:
    """A JSON file from a path or any fsspec URL (credentials from the environment)."""
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{url}: no such file") from None
    except json.JSONDecodeError as err:
        raise BadInput(f"{url}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{url}: not valid JSON (not UTF-8 text)") from None
    except (IsADirectoryError, PermissionError) as err:
        raise BadInput(f"{url}: cannot read ({err.strerror or err})") from None


def map_command(args: argparse.Namespace) -> int:
    thresholds = parse_thresholds(args.tiou)
    gt = parse_ground_truth(read_json(args.ground_truth), args.subset, source=args.ground_truth)
    preds = parse_predictions(read_json(args.predictions), source=args.predictions)
    result = evaluate_detection(gt, preds, thresholds)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    counts = result["counts"]
    print(f"{counts['predictions']} predictions, {counts['ground_truth']} ground-truth segments, "
          f"{counts['videos']} videos, {counts['classes']} classes (subset {args.subset})")
    print("tIoU   mAP (%)")
    for key, value in result["mAP"].items():
        print(f"{key}  {100 * value:7.2f}")
    print(f"avg   {100 * result['average_mAP']:7.2f}")
    if counts["predictions_in_videos_without_ground_truth"]:
        print(f"note: {counts['predictions_in_videos_without_ground_truth']} predictions are in videos without ground truth (false positives)")
    if result["labels_without_ground_truth"]:
        n = sum(result["labels_without_ground_truth"].values())
        print(f"note: {n} predictions have labels without ground truth in the subset (not in any class's AP): "
              + ", ".join(sorted(result["labels_without_ground_truth"])[:5])
              + (" ..." if len(result["labels_without_ground_truth"]) > 5 else ""))
    return 0
