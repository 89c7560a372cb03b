"""Ray job entry point for training.

    ray job submit --working-dir . -- python jobs/train.py --config configs/anet_re2swin_t.yaml [--set key=value ...]

Re-submitting with the same train.name resumes from its last checkpoint.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
