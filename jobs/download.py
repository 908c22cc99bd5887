"""spark-submit entry point of `curation download`: spark-submit --master local[2] jobs/download.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
