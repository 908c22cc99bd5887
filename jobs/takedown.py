"""Entry point of `curation takedown` (no Spark needed; runs under spark-submit or plain python alike):
python jobs/takedown.py RELEASE --output NEW_RELEASE [--uids FILE] [--urls FILE] [--image-hashes FILE]
[--reason TEXT]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["takedown", *sys.argv[1:]]))
