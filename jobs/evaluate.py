"""Ray job entry point for evaluating a checkpoint on the validation subset.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/anet_re2swin_t.yaml --checkpoint s3://bucket/runs/anet_re2swin_t/epoch0014
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
