"""spark-submit entry point of `curation flag-logos`: spark-submit --master local[2] jobs/flag_logos.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["flag-logos", *sys.argv[1:]]))
