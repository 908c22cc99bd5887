"""spark-submit entry point of `curation prune`: spark-submit --master local[2] jobs/prune.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
