"""spark-submit entry point of `curation publish`: spark-submit --master local[2] jobs/publish.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
