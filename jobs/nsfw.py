"""spark-submit entry point of `curation nsfw`: spark-submit --master local[2] jobs/nsfw.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["nsfw", *sys.argv[1:]]))
