"""spark-submit entry point of `curation dedup-text`: spark-submit --master local[2] jobs/dedup_text.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup-text", *sys.argv[1:]]))
