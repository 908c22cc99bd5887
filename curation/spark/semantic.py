"""Spark adapters of the embedding stages (DESIGN.md section 4): cluster, semdedup (SemDeDup, Abbas et al. 2023) and
prune (density-based pruning, Abbas et al., ICLR 2024).

Embeddings come from the nearest upstream embed stage (image embeddings, joined to the rows by uid). k-means is fit
on the driver, through the FAISS seam (GPU when present), on a uniform sample chosen by u(seed, uid) and sorted by
uid, with a fixed seed, thread count and `max_points_per_centroid` = ceil(sample / k) so that faiss trains on the
whole sample: the centroids depend on the rows, never on partitioning. Every row is then assigned in a
distributed pass with the centroids broadcast. Per-cluster work (SemDeDup, choosing the kept members) is one
`applyInArrow` group per cluster.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import ARTIFACTS_DIR, StageWriter, find_upstream, read_stage_record
from curation.ops import embeddings as embedding_ops
from curation.ops import prune as prune_ops
from curation.ops import semdedup as semdedup_ops
from curation.ops.embeddings import EMBEDDING_COLUMN
from curation.ops.uid import uniform
from curation.schema import UID, Reason
from curation.spark.common import StageRun, drop_where, untagged, write_tagged
from curation.spark.stages import read_stage_data, stage_input

logger = logging.getLogger(__name__)

STAGE_VERSIONS = {"cluster": 1, "semdedup": 1, "prune": 1}
CLUSTER = "cluster"
CENTROID_SIMILARITY = "centroid_similarity"
SAMPLE_PURPOSE = "kmeans_sample"
PRUNE_DRAW_PURPOSE = "prune_random"


@dataclass(frozen=True)
class KMeansOptions:
    k: int = 1000
    sample_size: int = 500_000
    iterations: int = 20
    threads: int = 4
    device: str = "auto"
    init: str = "random"
    seed: int = 0

    def __post_init__(self):
        if self.k < 1 or self.sample_size < 1 or self.iterations < 1 or self.threads < 1:
            raise ValueError("k, sample_size, iterations and threads must be positive")


def _embedding_reader(batches):
    for batch in batches:
        for path in batch.column(0).to_pylist():
            yield embedding_ops.read_packed(path)


def with_embeddings(spark, df, stage_dir: Path):
    """`df` with EMBEDDING_COLUMN (its rows' image embeddings, packed float16) from the upstream embed stage; a row
    without one is an error (rows downstream of embed all have one)."""
    from pyspark.sql import functions as F

    embed_dir = find_upstream(stage_dir, "embed")
    if embed_dir is None:
        raise ValueError(f"{stage_dir} has no embed stage upstream: run embed first")
    files = sorted(str(p) for p in (embed_dir / ARTIFACTS_DIR / "embeddings").glob("*.parquet"))
    paths = spark.createDataFrame([(f,) for f in files], "path string").repartition(max(1, len(files)))
    vectors = paths.mapInArrow(_embedding_reader, f"{UID} string, {EMBEDDING_COLUMN} binary")
    # Checkpointed before the check, so that callers do not read and join every embedding a second time.
    joined = df.join(vectors, UID, "left").localCheckpoint()
    missing = joined.filter(F.col(EMBEDDING_COLUMN).isNull()).limit(5).collect()
    if missing:
        raise ValueError(f"rows without an embedding in {embed_dir}: {[row[UID] for row in missing]}")
    return joined


def _sample_worker(seed: int, fraction: float):
    def run(batches):
        for batch in batches:
            draws = uniform(seed, batch.column(0), SAMPLE_PURPOSE)
            yield batch.filter(pa.array(draws < fraction))

    return run


def fit_centroids(emb_df, rows: int, options: KMeansOptions, purpose_seed: int):
    """Spherical k-means on a uniform sample of about `options.sample_size` rows (KMeansResult, sample rows)."""
    from curation.gpu import faiss_seam

    fraction = min(1.0, options.sample_size / max(rows, 1))
    sample = (
        emb_df.select(UID, EMBEDDING_COLUMN)
        .mapInArrow(_sample_worker(purpose_seed, fraction), f"{UID} string, {EMBEDDING_COLUMN} binary")
        .toArrow()
        .sort_by(UID)
    )
    if len(sample) == 0:
        # A small corpus with a small sample_size can draw no row at all; the first rows by uid stand in.
        sample = emb_df.select(UID, EMBEDDING_COLUMN).orderBy(UID).limit(options.k).toArrow()
    vectors = embedding_ops.unpack(sample.column(EMBEDDING_COLUMN))
    k = min(options.k, len(vectors))
    if k < 1:
        raise ValueError("no rows to cluster")
    if k < options.k:
        logger.warning("k = %d exceeds the %d sampled rows: using k = %d", options.k, len(vectors), k)
    result = faiss_seam.spherical_kmeans(
        vectors, k, iterations=options.iterations, seed=options.seed,
        max_points_per_centroid=math.ceil(len(vectors) / k), threads=options.threads, device=options.device,
        init=options.init,
    )
    return result, len(vectors)


def _assign_worker(centroids_broadcast, device: str):
    def run(batches):
        from curation.gpu import faiss_seam

        centroids = centroids_broadcast.value
        for batch in batches:
            vectors = embedding_ops.unpack(batch.column(1), centroids.shape[1])
            if len(vectors):
                clusters, similarity = faiss_seam.assign(vectors, centroids, device=device)
            else:
                clusters, similarity = np.empty(0, np.int64), np.empty(0, np.float32)
            yield pa.RecordBatch.from_arrays(
                [batch.column(0), pa.array(clusters.astype(np.int32)), pa.array(similarity.astype(np.float32))],
                names=[UID, CLUSTER, CENTROID_SIMILARITY],
            )

    return run


def assign_all(spark, emb_df, centroids: np.ndarray, device: str):
    """(uid, cluster, centroid_similarity) of every row: the nearest centroid by cosine."""
    centroids_broadcast = spark.sparkContext.broadcast(centroids)
    return emb_df.select(UID, EMBEDDING_COLUMN).mapInArrow(
        _assign_worker(centroids_broadcast, device), f"{UID} string, {CLUSTER} int, {CENTROID_SIMILARITY} float"
    )


def _kmeans_record(result, sample_rows: int, options: KMeansOptions) -> dict:
    return {
        "k": int(result.centroids.shape[0]), "sample_rows": sample_rows,
        "max_points_per_centroid": result.max_points_per_centroid, "iterations": result.iterations,
        "objective": result.objective[-1] if result.objective else None, "seed": result.seed,
        "threads": options.threads, "device": result.device, "init": result.init,
    }


def _write_without_rows(run: StageRun, df, input_dir: Path, output_dir: Path, columns: dict[str, str]) -> dict:
    """The stage folder of an empty input (every row was dropped upstream): no rows, the stage's columns added."""
    from pyspark.sql import functions as F

    for name, kind in columns.items():
        df = df.withColumn(name, F.lit(None).cast(kind))
    with StageWriter(output_dir) as writer:
        write_tagged(untagged(df), df.columns, str(writer.temp_dir), str(writer.ledger_dir))
        record = run.record(stage_input(input_dir, writer), 0, 0, {})
        writer.commit(record)
    return record


def _cluster_sizes(assigned) -> pa.Table:
    counts = assigned.groupBy(CLUSTER).count().toArrow().sort_by(CLUSTER)
    return pa.table({CLUSTER: counts.column(CLUSTER), "size": counts.column("count")})


def run_cluster(spark, input_dir: Path, output_dir: Path, options: KMeansOptions, config: dict | None = None) -> dict:
    """Rows gain `cluster` and `centroid_similarity`; artifacts centroids.npy, cluster_sizes.parquet and
    assignments/ (uid, cluster, centroid_similarity)."""
    run = StageRun("cluster", STAGE_VERSIONS["cluster"], config or {})
    df = read_stage_data(spark, input_dir, None)
    data_columns = [c for c in df.columns if c not in (CLUSTER, CENTROID_SIMILARITY)]
    rows_in = read_stage_record(input_dir)["rows_out"]
    if rows_in == 0:
        return _write_without_rows(run, df, input_dir, output_dir, {CLUSTER: "int", CENTROID_SIMILARITY: "float"})
    emb_df = with_embeddings(spark, df.select(UID), input_dir)
    result, sample_rows = fit_centroids(emb_df, rows_in, options, options.seed)
    assigned = assign_all(spark, emb_df, result.centroids, options.device).localCheckpoint()
    tagged = untagged(df.select(*data_columns).join(assigned, UID))
    with StageWriter(output_dir) as writer:
        np.save(writer.artifacts_dir / "centroids.npy", result.centroids)
        pq.write_table(_cluster_sizes(assigned), writer.artifacts_dir / "cluster_sizes.parquet")
        assigned.write.parquet(str(writer.artifacts_dir / "assignments"))
        rows_out, drops = write_tagged(tagged, [*data_columns, CLUSTER, CENTROID_SIMILARITY], str(writer.temp_dir),
                                       str(writer.ledger_dir))
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops,
                            kmeans=_kmeans_record(result, sample_rows, options))
        writer.commit(record)
    return record


# ---------------------------------------------------------------------------------------------------- semdedup

_SIMILARITY_SCHEMA = f"{UID} string, {CLUSTER} int, _order long, _max_sim float, _earlier string"


def _similarity_worker(block_rows: int):
    """Per cluster: the SemDeDup order and each member's largest similarity to an earlier member (eps-free)."""

    def run(table: pa.Table) -> pa.Table:
        uids = table.column(UID).to_pylist()
        order = semdedup_ops.semdedup_order(table.column(CENTROID_SIMILARITY).to_numpy(), uids)
        vectors = embedding_ops.unpack(table.column(EMBEDDING_COLUMN))[order]
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        max_sim, earlier = semdedup_ops.max_similarity_to_earlier(vectors, block_rows)
        ordered_uids = [uids[i] for i in order]
        return pa.table({
            UID: pa.array(ordered_uids, pa.string()),
            CLUSTER: pa.array(np.full(len(order), table.column(CLUSTER)[0].as_py(), np.int32)),
            "_order": pa.array(np.arange(len(order), dtype=np.int64)),
            "_max_sim": pa.array(np.where(np.isfinite(max_sim), max_sim, np.nan).astype(np.float32),
                                 from_pandas=True),
            "_earlier": pa.array([ordered_uids[i] if i >= 0 else None for i in earlier.tolist()], pa.string()),
        })

    return run


def _resolve_worker(threshold: float):
    """Per cluster, given the eps-free similarities: which members are kept and the kept member each drop joins."""

    def run(table: pa.Table) -> pa.Table:
        table = table.sort_by("_order")
        uids = table.column(UID).to_pylist()
        position = {uid: index for index, uid in enumerate(uids)}
        earlier = np.array([position[u] if u is not None else -1 for u in table.column("_earlier").to_pylist()],
                           dtype=np.int64)
        max_sim = table.column("_max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
        max_sim = np.where(np.isnan(max_sim), -np.inf, max_sim).astype(np.float32)
        keep, kept_index = semdedup_ops.resolve_kept(max_sim, earlier, threshold)
        return pa.table({
            UID: table.column(UID),
            "_keep": pa.array(keep),
            "_kept_uid": pa.array([uids[i] for i in kept_index.tolist()], pa.string()),
        })

    return run


def run_semdedup(
    spark, input_dir: Path, output_dir: Path, eps: float | None = semdedup_ops.DEFAULT_EPS,
    target_keep_fraction: float | None = None, block_rows: int = 2048, config: dict | None = None,
) -> dict:
    """SemDeDup inside the clusters of an upstream cluster stage: drop a member whose cosine similarity to an
    earlier member (in decreasing distance to the centroid) exceeds 1 - eps. With `target_keep_fraction`, eps is
    chosen from every member's similarity so that this fraction is kept. Ledger: semantic_duplicate with the kept
    uid the member resolves to, its cluster and similarity."""
    from pyspark.sql import functions as F

    if target_keep_fraction is not None and not 0 < target_keep_fraction <= 1:
        raise ValueError(f"target_keep_fraction must be in (0, 1], got {target_keep_fraction}")
    if target_keep_fraction is None and (eps is None or not 0 < eps < 2):
        raise ValueError(f"eps must be in (0, 2), got {eps}")
    run = StageRun("semdedup", STAGE_VERSIONS["semdedup"], config or {})
    df = read_stage_data(spark, input_dir, None)
    if CLUSTER not in df.columns or CENTROID_SIMILARITY not in df.columns:
        raise ValueError(f"{input_dir} rows have no {CLUSTER}/{CENTROID_SIMILARITY}: run the cluster stage first")
    rows_in = read_stage_record(input_dir)["rows_out"]
    similarities = (
        with_embeddings(spark, df.select(UID, CLUSTER, CENTROID_SIMILARITY), input_dir)
        .groupBy(CLUSTER).applyInArrow(_similarity_worker(block_rows), _SIMILARITY_SCHEMA)
        .localCheckpoint()
    )
    if target_keep_fraction is not None and rows_in == 0:
        eps = semdedup_ops.DEFAULT_EPS
    elif target_keep_fraction is not None:
        values = similarities.select("_max_sim").toArrow().column(0).to_numpy(zero_copy_only=False)
        eps = semdedup_ops.eps_for_keep_fraction(np.where(np.isnan(values), -np.inf, values), target_keep_fraction)
        logger.info("semdedup: eps = %.6g keeps %.3f of the rows", eps, target_keep_fraction)
    decisions = similarities.groupBy(CLUSTER).applyInArrow(
        _resolve_worker(1.0 - eps), f"{UID} string, _keep boolean, _kept_uid string"
    )
    joined = df.join(similarities.select(UID, "_max_sim"), UID).join(decisions, UID)
    dropped = ~F.col("_keep")
    detail = F.to_json(F.struct(F.col(CLUSTER).alias("cluster"), F.col("_kept_uid").alias("group"),
                                F.col("_max_sim").alias("similarity"), F.lit(eps).alias("eps")))
    tagged = drop_where(untagged(joined.withColumn("semdedup_max_similarity", F.col("_max_sim"))), dropped,
                        "semdedup", Reason.SEMANTIC_DUPLICATE, F.col("_kept_uid"), detail)
    data_columns = [c for c in df.columns if c != "semdedup_max_similarity"] + ["semdedup_max_similarity"]
    with StageWriter(output_dir) as writer:
        rows_out, drops = write_tagged(tagged, data_columns, str(writer.temp_dir), str(writer.ledger_dir))
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops,
                            semdedup={"eps": eps, "threshold": 1.0 - eps, "eps_from": "target_keep_fraction"
                                      if target_keep_fraction is not None else "eps",
                                      "target_keep_fraction": target_keep_fraction, "block_rows": block_rows})
        writer.commit(record)
    return record


# ---------------------------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PruneOptions:
    keep_fraction: float | None = None
    keep_count: int | None = None
    tau: float = prune_ops.DEFAULT_TAU
    ratio: float = prune_ops.DEFAULT_RATIO
    selection: str = "hard"

    def __post_init__(self):
        if self.selection not in prune_ops.SELECTION_MODES:
            raise ValueError(f"selection must be one of {prune_ops.SELECTION_MODES}, not {self.selection!r}")
        if (self.keep_fraction is None) == (self.keep_count is None):
            raise ValueError("give exactly one of keep_fraction and keep_count")


def _cluster_statistics(table: pa.Table) -> pa.Table:
    """A cluster's size and d_intra = mean(1 - cos to centroid), summed exactly (fsum): a Spark average merges
    partial sums in an order that follows the partitioning, and its last bits could flip a quota."""
    distances = 1.0 - table.column(CENTROID_SIMILARITY).to_numpy().astype(np.float64)
    return pa.table({CLUSTER: pa.array([table.column(CLUSTER)[0].as_py()], pa.int32()),
                     "size": pa.array([len(distances)], pa.int64()),
                     "d_intra": pa.array([math.fsum(distances) / len(distances)], pa.float64())})


def _selection_worker(quotas_broadcast, selection: str, seed: int):
    def run(table: pa.Table) -> pa.Table:
        cluster = table.column(CLUSTER)[0].as_py()
        uids = table.column(UID).to_pylist()
        distance = 1.0 - table.column(CENTROID_SIMILARITY).to_numpy().astype(np.float64)
        draws = uniform(seed, uids, PRUNE_DRAW_PURPOSE) if selection == "random" else None
        quota = int(quotas_broadcast.value[cluster])
        keep, rank = prune_ops.select_members(distance, uids, quota, selection, draws)
        return pa.table({UID: table.column(UID), "_keep": pa.array(keep), "_rank": pa.array(rank),
                         "_quota": pa.array(np.full(len(uids), quota, dtype=np.int64))})

    return run


def run_prune(
    spark, input_dir: Path, output_dir: Path, kmeans: KMeansOptions, options: PruneOptions, config: dict | None = None,
) -> dict:
    """Density-based pruning: re-cluster, score each cluster's complexity C_j = d_inter * d_intra, give it the quota
    N_j from P_j = softmax(C_j / tau) by water-filling, keep its N_j selected members (`hard`: farthest from the
    centroid). Ledger: pruned_dense_cluster with cluster, rank and quota; artifact pruning_clusters.parquet."""
    from pyspark.sql import functions as F

    run = StageRun("prune", STAGE_VERSIONS["prune"], config or {})
    df = read_stage_data(spark, input_dir, None)
    rows_in = read_stage_record(input_dir)["rows_out"]
    n_keep = prune_ops.keep_fraction_count(rows_in, options.keep_fraction, options.keep_count)
    if rows_in == 0:
        return _write_without_rows(run, df, input_dir, output_dir, {"prune_cluster": "int"})
    emb_df = with_embeddings(spark, df.select(UID), input_dir)
    result, sample_rows = fit_centroids(emb_df, rows_in, kmeans, kmeans.seed)
    assigned = assign_all(spark, emb_df, result.centroids, kmeans.device).localCheckpoint()
    k = result.centroids.shape[0]
    stats = assigned.groupBy(CLUSTER).applyInArrow(
        _cluster_statistics, f"{CLUSTER} int, size long, d_intra double"
    ).toArrow().sort_by(CLUSTER)
    sizes = np.zeros(k, dtype=np.int64)
    d_intra = np.zeros(k, dtype=np.float64)
    sizes[stats.column(CLUSTER).to_numpy()] = stats.column("size").to_numpy()
    d_intra[stats.column(CLUSTER).to_numpy()] = stats.column("d_intra").to_numpy()
    table = prune_ops.pruning_table(sizes, d_intra, result.centroids, n_keep, tau=options.tau, ratio=options.ratio)
    quotas_broadcast = spark.sparkContext.broadcast(np.asarray(table["quota"]))
    selected = assigned.groupBy(CLUSTER).applyInArrow(
        _selection_worker(quotas_broadcast, options.selection, kmeans.seed),
        f"{UID} string, _keep boolean, _rank long, _quota long",
    )
    joined = df.join(assigned.select(UID, F.col(CLUSTER).alias("prune_cluster")), UID).join(selected, UID)
    dropped = ~F.col("_keep")
    detail = F.to_json(F.struct(F.col("prune_cluster").alias("cluster"), F.col("_rank").alias("rank"),
                                F.col("_quota").alias("quota")))
    tagged = drop_where(untagged(joined), dropped, "prune", Reason.PRUNED_DENSE_CLUSTER, detail=detail)
    data_columns = [c for c in df.columns if c != "prune_cluster"] + ["prune_cluster"]
    with StageWriter(output_dir) as writer:
        np.save(writer.artifacts_dir / "prune_centroids.npy", result.centroids)
        pq.write_table(pa.table({name: np.asarray(values) for name, values in table.items()}),
                       writer.artifacts_dir / "pruning_clusters.parquet")
        rows_out, drops = write_tagged(tagged, data_columns, str(writer.temp_dir), str(writer.ledger_dir))
        if rows_out != n_keep:
            raise RuntimeError(f"prune kept {rows_out} rows, the quotas say {n_keep}")
        record = run.record(stage_input(input_dir, writer), rows_in, rows_out, drops,
                            kmeans=_kmeans_record(result, sample_rows, kmeans),
                            prune={"n_keep": n_keep, "keep_fraction": options.keep_fraction,
                                   "keep_count": options.keep_count, "tau": options.tau, "ratio": options.ratio,
                                   "selection": options.selection, "empty_clusters": int((sizes == 0).sum())})
        writer.commit(record)
    quotas_broadcast.unpersist()
    return record
