"""spark-submit entry point of every stage command: spark-submit --master local[2] jobs/stage.py STAGE [options].

STAGE is any stage of the registry (curation.stages), written as on the command line (`dedup-text`), followed by
that command's flags; a stage added to the registry has its entry point here with nothing else to write."""

import logging
import sys

from curation.cli import STAGE_COMMANDS, configure_logging, main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STAGE_COMMANDS:
        configure_logging(verbose=False)
        logging.getLogger("curation").error("usage: jobs/stage.py STAGE [options]; STAGE is one of %s",
                                            ", ".join(STAGE_COMMANDS))
        sys.exit(2)
    sys.exit(main(sys.argv[1:]))
