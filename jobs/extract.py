"""Ray job entry point for extracting clip features of a collection of videos.

    ray job submit --working-dir . -- python jobs/extract.py --config configs/hacs_tada2d_r50.yaml \
        --set backbone.pretrained=s3://B/runs/k400/backbone.pth --out s3://B/features/hacs

Re-submitting extracts only the videos without features under DIR.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
