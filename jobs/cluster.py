"""spark-submit entry point of `curation cluster`: spark-submit --master local[2] jobs/cluster.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
