"""spark-submit entry point of `curation semdedup`: spark-submit --master local[2] jobs/semdedup.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["semdedup", *sys.argv[1:]]))
