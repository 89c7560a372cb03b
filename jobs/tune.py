"""Ray job entry point for a Ray Tune sweep (search space in the config's tune section).

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/augment.yaml

Relative local paths (in the config or flags) would point into Ray's temporary copy of the working
directory: add `--base-dir $PWD` on a one-machine cluster, or use absolute / s3:// paths.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
