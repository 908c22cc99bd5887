"""`curation inspect RUN_DIR`: the story of one sample (`--uid`) or one metadata entry (`--entry`), from the run
folder alone, with pyarrow (no Spark).

A sample's story follows the run's stage chain (the records' input links, from ingest to publish, or to the last
complete stage of a run without a release): in which stage folders its row is, what each stage added to it (entry
ids, scores, groups, image fields), where it was published, or the ledger row that says where and why it was
dropped, with the uid it was a duplicate of (and that uid's own fate). A survivor is told how many ledger rows name
it as their `related_uid`. Every read is a pyarrow dataset scan with a filter on `uid` and only the columns needed.

An entry's story: its id in the metadata the match stage used, its counts at each count and balance stage (their
`entry_counts.parquet` and `balanced_counts.parquet` artifacts), how many rows hold it in each stage's data, and a
few example rows from the release (or the last stage that still has rows holding it).
"""

from curation.inspection.common import InspectError
from curation.inspection.entry import inspect_entry
from curation.inspection.sample import inspect_uid

__all__ = ["InspectError", "inspect_entry", "inspect_uid"]
