"""spark-submit entry point of `curation dedup-exact`: spark-submit --master local[2] jobs/dedup_exact.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup-exact", *sys.argv[1:]]))
