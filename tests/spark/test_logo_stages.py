"""logo_bank -> mine_logos -> flag_logos on Spark, end to end from a 127.0.0.1 image server through download and
embed with a randomly initialised tiny-clip (the path, shapes, artifacts and resume; the toy scorer's planted
feature is what makes red logos rank first in mining)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.image_server import ImageServer, Response, dict_resolver
from curation.io import ARTIFACTS_DIR, LEDGER_DIR
from curation.manifest import verify_manifest
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.schema import Reason
from curation.spark.common import StageRun
from tests import imagekit

pytestmark = pytest.mark.spark

MINING = {"targets": ["greedy", "harmless"], "models": ["tiny-clip:random", "toy"], "probe_count": 6, "max_logos": 8,
          "logo_block": 2, "batch_size": 8, "recheck_top": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def logo_run(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("logos")
    routes = {f"/photo/{i}.jpg": Response(200, imagekit.jpeg(photo), "image/jpeg")
              for i, photo in enumerate(imagekit.photos(10))}
    logos = imagekit.logos(6, red=2)
    routes |= {f"/logo/{name}.jpg": Response(200, imagekit.jpeg(imagekit.on_white(logo)), "image/jpeg")
               for name, logo, _ in logos}
    with ImageServer(dict_resolver(routes)) as server:
        urls = sorted(f"{server.base_url}{path}" for path in routes)
        pq.write_table(
            pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}),
            root / "raw.parquet",
        )
        run_one_stage(spark, "ingest", [str(root / "raw.parquet")], root / "ingest")
        run_one_stage(spark, "download", root / "ingest", root / "download",
                      {"allow_hosts": [f"127.0.0.1:{server.port}"], "image_size": 96, "timeout": 5,
                       "thread_count": 4, "shard_rows": 8})
    run_one_stage(spark, "embed", root / "download", root / "embed",
                  {"model": "tiny-clip", "pretrained": "random", "device": "cpu", "num_workers": 0})
    run_one_stage(spark, "logo_bank", root / "embed", root / "logo_bank", {"q": 0.5})
    run_one_stage(spark, "mine_logos", root / "logo_bank", root / "mine_logos", MINING)
    run_one_stage(spark, "flag_logos", root / "mine_logos", root / "flag_logos",
                  {"threshold": 0.999, "top": 2, "min_spuriousness": -1.0, "policy": "drop"})
    return root, len(urls)


def test_bank_takes_the_top_q_collapses_duplicates_and_copies_the_images(logo_run):
    root, rows = logo_run
    bank = pq.read_table(root / "logo_bank" / ARTIFACTS_DIR / "logo_bank.parquet").to_pylist()
    record = read_stage_record(root / "logo_bank")
    assert record["logo_bank"]["taken"] == math.ceil(0.5 * rows)
    assert sum(entry["frequency"] for entry in bank) == record["logo_bank"]["taken"]
    assert [entry["score"] for entry in bank] == sorted((entry["score"] for entry in bank), reverse=True)
    for entry in bank:
        assert entry["members"][0] == entry["logo_uid"]
        [image] = list((root / "logo_bank" / ARTIFACTS_DIR / "bank").glob(f"{entry['logo_uid']}.*"))
        Image.open(image).verify()
    scores = pq.read_table(root / "logo_bank", columns=["logo_score"]).column(0)
    assert scores.null_count == 0 and len(scores) == rows


def test_mining_ranks_every_bank_logo_for_every_target_with_both_models(logo_run):
    root, rows = logo_run
    table = pq.read_table(root / "mine_logos" / ARTIFACTS_DIR / "mining.parquet")
    bank = pq.read_table(root / "logo_bank" / ARTIFACTS_DIR / "logo_bank.parquet")
    assert len(table) == len(bank) * len(MINING["targets"])
    assert set(table.column("target").to_pylist()) == set(MINING["targets"])
    record = read_stage_record(root / "mine_logos")
    assert record["rows_in"] == record["rows_out"] == rows and record["data_from"]
    assert len(record["mining"]["models"]) == 2
    assert record["mining"]["ten_crop"] is not None
    sheet = Image.open(root / "mine_logos" / ARTIFACTS_DIR / "contact_sheet.png")
    assert sheet.width > 0 and sheet.height > 0


def test_flag_logos_drops_images_of_the_top_mined_logos(logo_run):
    root, rows = logo_run
    record = read_stage_record(root / "flag_logos")
    ledger = pq.read_table(root / "flag_logos" / LEDGER_DIR).to_pylist()
    assert ledger and {row["reason"] for row in ledger} == {Reason.SPURIOUS_LOGO}
    assert {row["related_uid"] for row in ledger} <= set(record["flag_logos"]["logos"])
    assert all(json.loads(row["detail"])["similarity"] >= 0.999 for row in ledger)
    assert record["rows_out"] + len(ledger) == rows


def test_release_after_the_logo_stages_verifies(spark, logo_run):
    root, _ = logo_run
    run_one_stage(spark, "publish", root / "flag_logos", root / "publish", {"shard_rows": 100})
    assert verify_manifest(root / "publish") == []


def test_mining_resumes_after_a_crash_with_the_same_ranking(spark, logo_run, tmp_path, monkeypatch):
    root, _ = logo_run

    def crash(*args, **kwargs):
        raise RuntimeError("killed after mining")

    with monkeypatch.context() as patch:
        patch.setattr(StageRun, "record", crash)
        with pytest.raises(RuntimeError, match="killed"):
            run_one_stage(spark, "mine_logos", root / "logo_bank", tmp_path / "mine", MINING)
    assert sorted(p.name for p in (tmp_path / ".mine.work" / "blocks").glob("block-*.parquet"))
    run_one_stage(spark, "mine_logos", root / "logo_bank", tmp_path / "mine", MINING)
    again = pq.read_table(tmp_path / "mine" / ARTIFACTS_DIR / "mining.parquet")
    first = pq.read_table(root / "mine_logos" / ARTIFACTS_DIR / "mining.parquet")
    assert again.equals(first)
