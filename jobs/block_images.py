"""spark-submit entry point of `curation block-images`:
spark-submit --master local[2] jobs/block_images.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["block-images", *sys.argv[1:]]))
