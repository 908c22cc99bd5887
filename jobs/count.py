"""spark-submit entry point of `curation count`: spark-submit --master local[2] jobs/count.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["count", *sys.argv[1:]]))
