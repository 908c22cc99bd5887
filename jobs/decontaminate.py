"""spark-submit entry point of `curation decontaminate`: spark-submit --master local[2] jobs/decontaminate.py
[options]."""

import sys

from curation.cli import main

if __name__ == "__main__":
    sys.exit(main(["decontaminate", *sys.argv[1:]]))
