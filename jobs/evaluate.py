"""Ray job entry point for evaluating a checkpoint on the validation subset.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/anet_re2swin_t.yaml --checkpoint s3://bucket/runs/anet_re2swin_t/epoch0014

Relative local paths (in the config or flags) would point into Ray's temporary copy of the working
directory: add `--base-dir $PWD` on a one-machine cluster, or use absolute / s3:// paths.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
