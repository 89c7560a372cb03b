"""Ray job entry point for training.

    ray job submit --working-dir . -- python jobs/train.py --config configs/anet_re2swin_t.yaml [--set key=value ...]

Re-submitting with the same train.name resumes from its last checkpoint.

Relative local paths (in the config or flags) would point into Ray's temporary copy of the working
directory: add `--base-dir $PWD` on a one-machine cluster, or use absolute / s3:// paths.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
