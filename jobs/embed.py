"""spark-submit entry point of `curation embed`: spark-submit --master local[2] jobs/embed.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
