"""spark-submit entry point of `curation logo-bank`: spark-submit --master local[2] jobs/logo_bank.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["logo-bank", *sys.argv[1:]]))
