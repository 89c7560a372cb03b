"""Ray job entry point for a Ray Tune sweep (search space in the config's tune section).

    ray job submit --working-dir . -- python jobs/tune.py --config configs/tune/augment.yaml
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
