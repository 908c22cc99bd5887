"""spark-submit entry point of `curation filter`: spark-submit --master local[2] jobs/filter.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
