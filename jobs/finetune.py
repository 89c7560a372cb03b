"""Ray job entry point for action-recognition fine-tuning (Re²TAL's Kinetics stage).

    ray job submit --working-dir . -- python jobs/finetune.py --config configs/k400_re2swin_t.yaml [--set key=value ...]

Re-submitting with the same train.name resumes from its last checkpoint; the backbone file is
written at the end (finetune.output).

Relative local paths (in the config or flags) would point into Ray's temporary copy of the working
directory: add `--base-dir $PWD` on a one-machine cluster, or use absolute / s3:// paths.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
