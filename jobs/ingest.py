"""spark-submit entry point of `curation ingest`: spark-submit --master local[2] jobs/ingest.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
