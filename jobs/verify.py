"""spark-submit entry point of `curation verify`: spark-submit --master local[2] jobs/verify.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
