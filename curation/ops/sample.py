"""A seeded sample of rows: row r is kept iff u(seed, r.uid, "sample") < fraction (DESIGN.md section 3), so the
sample is the same for any partitioning, executor count or rerun, and a larger fraction keeps a superset."""

import json

import numpy as np
import pyarrow as pa

from curation.ops.uid import uniform
from curation.schema import UID

SAMPLE_PURPOSE = "sample"
SAMPLED_OUT = "sampled_out"  # the ledger reason of the rows the sample leaves out


def sample_rows(table: pa.Table, fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(kept rows, dropped rows as uid, reason, detail) of `table`; the detail names the draw and the fraction."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    draws = uniform(seed, table.column(UID), SAMPLE_PURPOSE)
    keep = draws < fraction
    dropped_index = np.flatnonzero(~keep)
    details = [json.dumps({"u": float(draws[i]), "fraction": fraction}) for i in dropped_index]
    dropped = pa.table({
        UID: table.column(UID).take(pa.array(dropped_index, pa.int64())),
        "reason": pa.array([SAMPLED_OUT] * len(dropped_index), pa.string()),
        "detail": pa.array(details, pa.string()),
    })
    return table.filter(pa.array(keep)), dropped
