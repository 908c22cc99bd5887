"""spark-submit entry point of `curation match`: spark-submit --master local[2] jobs/match.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["match", *sys.argv[1:]]))
