"""cluster -> semdedup -> prune on Spark over synthetic embeddings with planted duplicate groups.

The embed stage folder is written here in the embed stage's own format (rows + `_artifacts/embeddings/*.parquet`
of `embedding_schema`), so that the vectors can be planted: concept clouds of distinct images plus groups of
near-copies (cosine > 0.999 to their original).
"""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main as cli_main
from curation.gpu.shard_embedding import embedding_schema
from curation.io import ARTIFACTS_DIR, LEDGER_DIR, StageWriter, fingerprint_files, list_files
from curation.pipeline import run_one_stage
from curation.run_folder import read_stage_record
from curation.schema import Reason
from curation.spark.common import StageRun

pytestmark = pytest.mark.spark
logger = logging.getLogger(__name__)

DIM = 32
CONCEPTS = 12
DISTINCT_ROWS = 1500
GROUPS = 80
EPS = 0.005


def _unit(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def _planted_vectors() -> tuple[np.ndarray, list[list[int]]]:
    """Rows: distinct images around CONCEPTS concept directions, then GROUPS groups of 1-3 near-copies of distinct
    rows. Returns the vectors and the planted groups as row lists (original first)."""
    rng = np.random.default_rng(11)
    concepts = _unit(rng.normal(size=(CONCEPTS, DIM)))
    labels = rng.integers(0, CONCEPTS, DISTINCT_ROWS)
    distinct = _unit(concepts[labels] + rng.normal(scale=0.35, size=(DISTINCT_ROWS, DIM)))
    originals = rng.choice(DISTINCT_ROWS, size=GROUPS, replace=False)
    copies, groups = [], []
    for original in originals.tolist():
        members = [original]
        for _ in range(int(rng.integers(1, 4))):
            members.append(DISTINCT_ROWS + len(copies))
            copies.append(_unit(distinct[original] + rng.normal(scale=0.004, size=DIM)[None])[0])
        groups.append(members)
    return np.vstack([distinct, np.array(copies)]).astype(np.float32), groups


def _write_embed_stage(ingest_dir: Path, embed_dir: Path, vectors: np.ndarray, uids: list[str], files: int) -> None:
    """An embed stage folder over the ingest rows with the given image embeddings (text embeddings equal them)."""
    order = np.argsort(uids)
    rows = pq.read_table(ingest_dir).sort_by("uid")
    run = StageRun("embed", 1, {"stage": "embed", "planted": True})
    with StageWriter(embed_dir) as writer:
        half = vectors.astype(np.float16)
        for part, chunk in enumerate(np.array_split(order, files)):
            flat = pa.array(half[chunk].reshape(-1))
            table = pa.Table.from_arrays(
                [pa.array([uids[i] for i in chunk], pa.string()),
                 pa.FixedSizeListArray.from_arrays(flat, DIM), pa.FixedSizeListArray.from_arrays(flat, DIM),
                 pa.array(np.ones(len(chunk), np.float32))],
                schema=embedding_schema(DIM),
            )
            (writer.artifacts_dir / "embeddings").mkdir(exist_ok=True)
            pq.write_table(table, writer.artifacts_dir / "embeddings" / f"{part:05d}.parquet")
            pq.write_table(rows.filter(pa.array(np.isin(rows.column("uid").to_numpy(zero_copy_only=False),
                                                        [uids[i] for i in chunk]))),
                           writer.temp_dir / f"part-{part:05d}.parquet")
        upstream = {"stage": writer.link_to(ingest_dir), "fingerprint": fingerprint_files(list_files(ingest_dir))}
        writer.commit(run.record(upstream, len(rows), len(rows), {}))


def _chain(spark, root: Path, files: int) -> tuple[Path, list[str], list[list[int]]]:
    vectors, groups = _planted_vectors()
    urls = [f"https://img.example/{i}.jpg" for i in range(len(vectors))]
    raw = root / "raw"
    raw.mkdir()
    for part, chunk in enumerate(np.array_split(np.arange(len(vectors)), files)):
        pq.write_table(pa.table({"url": [urls[i] for i in chunk], "caption": [f"image {i}" for i in chunk]}),
                       raw / f"part-{part}.parquet")
    run_one_stage(spark, "ingest", [str(raw)], root / "ingest", {"partitions": files})
    by_url = dict(zip(*pq.read_table(root / "ingest", columns=["url", "uid"]).to_pydict().values(), strict=True))
    uids = [by_url[url] for url in urls]
    _write_embed_stage(root / "ingest", root / "embed", vectors, uids, files)
    kmeans = {"sample_size": 100_000, "threads": 1, "device": "cpu", "seed": 3}
    run_one_stage(spark, "cluster", root / "embed", root / "cluster", {"k": CONCEPTS, **kmeans})
    run_one_stage(spark, "semdedup", root / "cluster", root / "semdedup", {"eps": EPS})
    run_one_stage(spark, "prune", root / "semdedup", root / "prune", {"k": 8, **kmeans, "keep_fraction": 0.5})
    return root, uids, groups


@pytest.fixture(scope="module")
def chains(spark, tmp_path_factory):
    one = _chain(spark, tmp_path_factory.mktemp("one_partition"), files=1)
    spark.conf.set("spark.sql.shuffle.partitions", "7")
    try:
        four = _chain(spark, tmp_path_factory.mktemp("four_partitions"), files=4)
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    return one, four


def _kept(stage_dir: Path) -> set[str]:
    return set(pq.read_table(stage_dir, columns=["uid"]).column("uid").to_pylist())


def test_semdedup_keeps_one_member_of_each_planted_group_and_nothing_else_is_dropped(chains):
    (root, uids, groups), _ = chains
    clusters = dict(zip(*pq.read_table(root / "cluster", columns=["uid", "cluster"]).to_pydict().values(),
                        strict=True))
    kept = _kept(root / "semdedup")
    ledger = {row["uid"]: row for row in pq.read_table(root / "semdedup" / LEDGER_DIR).to_pylist()}
    planted = {uids[i] for group in groups for i in group}
    split = 0
    for group in groups:
        members = [uids[i] for i in group]
        if len({clusters[m] for m in members}) > 1:
            split += 1
            continue
        assert sum(m in kept for m in members) == 1, members
        survivor = next(m for m in members if m in kept)
        for loser in (m for m in members if m not in kept):
            assert ledger[loser]["reason"] == Reason.SEMANTIC_DUPLICATE
            assert ledger[loser]["related_uid"] == survivor
            assert json.loads(ledger[loser]["detail"])["cluster"] == clusters[survivor]
    logger.info("%d of %d planted groups were split by cluster boundaries", split, len(groups))
    assert split < len(groups) // 4
    assert set(ledger) <= planted, "a row outside the planted groups was dropped"


def test_kept_uids_do_not_depend_on_partitioning(chains):
    (one, _, _), (four, _, _) = chains
    assert np.array_equal(np.load(one / "cluster" / ARTIFACTS_DIR / "centroids.npy"),
                          np.load(four / "cluster" / ARTIFACTS_DIR / "centroids.npy"))
    for stage in ("cluster", "semdedup", "prune"):
        assert _kept(one / stage) == _kept(four / stage), stage


def test_prune_keeps_exactly_the_quotas(chains):
    (root, _, _), _ = chains
    record = read_stage_record(root / "prune")
    assert record["rows_out"] == record["prune"]["n_keep"] == math.floor(0.5 * record["rows_in"] + 0.5)
    table = pq.read_table(root / "prune" / ARTIFACTS_DIR / "pruning_clusters.parquet").to_pydict()
    assert sum(table["quota"]) == record["rows_out"]
    assert all(lower <= quota <= size for lower, quota, size in
               zip(table["lower_bound"], table["quota"], table["size"], strict=True))
    kept_per_cluster = pq.read_table(root / "prune", columns=["prune_cluster"]).column(0).value_counts().to_pylist()
    assert {item["values"]: item["counts"] for item in kept_per_cluster} == {
        cluster: quota for cluster, quota in zip(table["cluster"], table["quota"], strict=True) if quota
    }
    ledger = pq.read_table(root / "prune" / LEDGER_DIR).to_pylist()
    assert {row["reason"] for row in ledger} == {Reason.PRUNED_DENSE_CLUSTER}
    detail = json.loads(ledger[0]["detail"])
    assert detail["rank"] > detail["quota"]


def test_target_keep_fraction_chooses_eps(spark, chains, tmp_path):
    (root, _, _), _ = chains
    record = run_one_stage(spark, "semdedup", root / "cluster", tmp_path / "semdedup", {"target_keep_fraction": 0.8})
    assert record["rows_out"] >= 0.8 * record["rows_in"]
    assert record["rows_out"] <= 0.8 * record["rows_in"] + 2
    assert record["semdedup"]["eps_from"] == "target_keep_fraction"


def test_cli_commands_run_the_stages(chains, tmp_path):
    (root, _, _), _ = chains
    assert cli_main(["cluster", "--input", str(root / "embed"), "--output", str(tmp_path / "cluster"), "--k", "5",
                     "--threads", "1", "--device", "cpu"]) == 0
    assert cli_main(["semdedup", "--input", str(tmp_path / "cluster"), "--output", str(tmp_path / "semdedup"),
                     "--eps", "0.005"]) == 0
    assert cli_main(["prune", "--input", str(tmp_path / "semdedup"), "--output", str(tmp_path / "prune"),
                     "--k", "4", "--keep-count", "100", "--threads", "1"]) == 0
    assert read_stage_record(tmp_path / "prune")["rows_out"] == 100
    assert cli_main(["prune", "--input", str(tmp_path / "semdedup"), "--output", str(tmp_path / "bad"),
                     "--k", "4"]) == 2


def test_stages_pass_an_empty_input_through(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                   raw / "part-0.parquet")
    run_one_stage(spark, "ingest", [str(raw)], tmp_path / "ingest")
    _write_embed_stage(tmp_path / "ingest", tmp_path / "embed", np.empty((0, DIM), np.float32), [], files=1)
    kmeans = {"k": 4, "threads": 1, "device": "cpu"}
    assert run_one_stage(spark, "cluster", tmp_path / "embed", tmp_path / "cluster", kmeans)["rows_out"] == 0
    assert run_one_stage(spark, "semdedup", tmp_path / "cluster", tmp_path / "semdedup",
                         {"target_keep_fraction": 0.5})["rows_out"] == 0
    assert run_one_stage(spark, "prune", tmp_path / "semdedup", tmp_path / "prune",
                         {**kmeans, "keep_fraction": 0.5})["rows_out"] == 0
    assert "prune_cluster" in pq.read_schema(next((tmp_path / "prune").glob("*.parquet"))).names


def _in_memory_semdedup(root: Path, block_rows: int, eps: float) -> tuple[dict[str, float], set[str]]:
    """({uid: max_sim}, kept uids) computed as the semdedup stage did before it streamed: each whole cluster's
    float16 vectors in SemDeDup order, normalised, through max_similarity_to_earlier."""
    from curation.ops.semdedup import max_similarity_to_earlier, resolve_kept, semdedup_order

    rows = pq.read_table(root / "cluster", columns=["uid", "cluster", "centroid_similarity"])
    stored = pq.read_table(root / "embed" / ARTIFACTS_DIR / "embeddings", columns=["uid", "image_embedding"])
    flat = stored.column("image_embedding").combine_chunks().flatten().to_numpy()
    vectors = dict(zip(stored.column("uid").to_pylist(), flat.reshape(len(stored), DIM), strict=True))
    max_sims, kept = {}, set()
    clusters = rows.column("cluster").to_numpy()
    for cluster in np.unique(clusters).tolist():
        members = rows.filter(pa.array(clusters == cluster))
        uids = members.column("uid").to_pylist()
        order = semdedup_order(members.column("centroid_similarity").to_numpy(), uids)
        ordered = np.array([vectors[uids[i]] for i in order]).astype(np.float32)
        ordered /= np.linalg.norm(ordered, axis=1, keepdims=True)
        max_sim, earlier = max_similarity_to_earlier(ordered, block_rows)
        keep, _ = resolve_kept(max_sim, earlier, 1.0 - eps)
        max_sims.update({uids[i]: value for i, value in zip(order.tolist(), max_sim.tolist(), strict=True)})
        kept.update(uids[i] for i, k in zip(order.tolist(), keep.tolist(), strict=True) if k)
    return max_sims, kept


def test_streamed_semdedup_equals_the_whole_cluster_computation_bit_for_bit(spark, chains, tmp_path):
    (root, _, _), _ = chains
    record = run_one_stage(spark, "semdedup", root / "cluster", tmp_path / "semdedup", {"eps": EPS, "block_rows": 32})
    assert "split" not in record["semdedup"]
    expected_sims, expected_kept = _in_memory_semdedup(root, 32, EPS)
    written = pq.read_table(tmp_path / "semdedup", columns=["uid", "semdedup_max_similarity"]).to_pydict()
    ledger = pq.read_table(tmp_path / "semdedup" / LEDGER_DIR).to_pylist()
    assert set(written["uid"]) == expected_kept
    for uid, value in zip(written["uid"], written["semdedup_max_similarity"], strict=True):
        expected = expected_sims[uid]
        assert (value is None and expected == -math.inf) or np.float32(value) == np.float32(expected), uid
    for row in ledger:
        assert np.float32(json.loads(row["detail"])["similarity"]) == np.float32(expected_sims[row["uid"]])
        assert "part" not in json.loads(row["detail"])


def test_a_cluster_over_the_cap_is_split_by_a_sub_kmeans_and_the_split_recorded(spark, chains, tmp_path):
    (root, _, _), _ = chains
    sizes = pq.read_table(root / "cluster" / ARTIFACTS_DIR / "cluster_sizes.parquet").to_pydict()
    cap = 100
    record = run_one_stage(spark, "semdedup", root / "cluster", tmp_path / "semdedup",
                           {"eps": EPS, "max_cluster_rows": cap, "seed": 5})
    split = record["semdedup"]["split"]
    oversized = {c: s for c, s in zip(sizes["cluster"], sizes["size"], strict=True) if s > cap}
    assert split["max_cluster_rows"] == cap
    assert [(c["cluster"], c["size"]) for c in split["clusters"]] == sorted(oversized.items())
    for entry in split["clusters"]:
        assert entry["parts"] == len(entry["part_sizes"]) == math.ceil(entry["size"] / cap)
        assert sum(entry["part_sizes"]) == entry["size"]
    details = [json.loads(row["detail"]) for row in pq.read_table(tmp_path / "semdedup" / LEDGER_DIR).to_pylist()]
    assert details and all(("part" in d) == (d["cluster"] in oversized) for d in details)
    # The planted near-copies (cosine > 0.999) fall in one part: the split keeps exactly what the unsplit run keeps.
    assert _kept(tmp_path / "semdedup") == _kept(root / "semdedup")
