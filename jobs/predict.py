"""Ray job entry point for predicting action segments in a collection of videos.

    ray job submit --working-dir . -- python jobs/predict.py --model s3://B/runs/anet/epoch0014-step00012345 \
        --videos s3://B/videos/ --out s3://B/predictions/anet.json

Re-submitting predicts only the videos without a result under OUT.parts/.
"""

import sys

from re2tal.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
