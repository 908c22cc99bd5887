"""spark-submit entry point of `curation dedup-image`: spark-submit --master local[2] jobs/dedup_image.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup-image", *sys.argv[1:]]))
