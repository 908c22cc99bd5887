"""Balancing twice (before and after the image stages): each pass keeps each row with its own P(keep).

With one shared keep draw the second pass would keep every survivor of the first with min(1, P2 / P1): far more
than sum P2. The demo run balances at t = 20 and again at t = 10 after the image stages.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.io import LEDGER_DIR, list_files
from curation.ops.balance import BALANCE_PURPOSE, balance_purpose
from curation.run_folder import resolve_data_dir, stage_chain
from curation.schema import KEEP_PROBABILITY

pytestmark = pytest.mark.spark


def _probabilities(folder):
    kept = np.concatenate([pq.read_table(f, columns=[KEEP_PROBABILITY]).column(0).to_numpy()
                           for f in list_files(resolve_data_dir(folder))])
    dropped = [json.loads(detail)["p_keep"] for f in list_files(folder / LEDGER_DIR)
               for detail in pq.read_table(f, columns=["detail"]).column(0).to_pylist()]
    return kept, np.asarray(dropped, dtype=np.float64)


def test_every_balance_pass_keeps_about_the_sum_of_its_keep_probabilities(demo_run):
    balances = [(folder, record) for folder, record in stage_chain(demo_run / "publish")
                if record["stage"] == "balance"]
    assert len(balances) == 2
    for passes, (folder, record) in enumerate(balances):
        assert record["balancing"]["draw_purpose"] == balance_purpose(passes)
        kept, dropped = _probabilities(folder)
        probabilities = np.concatenate([kept, dropped])
        expected, sigma = probabilities.sum(), np.sqrt((probabilities * (1 - probabilities)).sum())
        assert len(kept) == record["rows_out"] and len(probabilities) == record["rows_in"]
        assert abs(len(kept) - expected) <= 4 * sigma + 1, (folder.name, len(kept), expected, sigma)
        assert record["rows_in"] - record["rows_out"] > 0, f"{folder.name} dropped nothing"


def test_the_first_pass_keeps_the_historical_draw():
    assert balance_purpose(0) == BALANCE_PURPOSE
    assert len({balance_purpose(k) for k in range(4)}) == 4
