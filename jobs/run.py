"""spark-submit entry point of `curation run`: spark-submit --master local[2] jobs/run.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
