"""Ray job entry point for preparing a dataset's videos (transcoding to the training size and fps).

    ray job submit --working-dir . -- python jobs/prepare.py --annotations s3://B/anet/annotations.json --out s3://B/anet/prepared

Re-submitting does only the videos not prepared yet.

Relative local paths (in the config or flags) would point into Ray's temporary copy of the working
directory: add `--base-dir $PWD` on a one-machine cluster, or use absolute / s3:// paths.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
