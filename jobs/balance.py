"""spark-submit entry point of `curation balance`: spark-submit --master local[2] jobs/balance.py [options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["balance", *sys.argv[1:]]))
