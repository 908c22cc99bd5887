"""spark-submit entry point of `curation mine-logos`: spark-submit --master local[2] jobs/mine_logos.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine-logos", *sys.argv[1:]]))
