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
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.ops import embeddings as embedding_ops
from curation.ops import prune as prune_ops
from curation.ops import semdedup as semdedup_ops
from curation.ops.embeddings import EMBEDDING_COLUMN
from curation.ops.uid import uniform
from curation.run_folder import Artifact, artifact_path, find_upstream
from curation.schema import UID, Reason
from curation.spark.common import drop_where, untagged
from curation.spark.executor import StageContext, StageOutput

logger = logging.getLogger(__name__)

CLUSTER = "cluster"
CENTROID_SIMILARITY = "centroid_similarity"
SAMPLE_PURPOSE = "kmeans_sample"
PRUNE_DRAW_PURPOSE = "prune_random"


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
    files = sorted(str(p) for p in artifact_path(embed_dir, Artifact.EMBEDDINGS).glob("*.parquet"))
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


def fit_centroids(emb_df, rows: int, options):
    """Spherical k-means on a uniform sample of about `options.sample_size` rows, drawn by u(seed, uid) (KMeansResult,
    sample rows). `options` is the cluster or prune stage's typed options (both have the k-means fields and `k`)."""
    from curation.gpu import faiss_seam

    fraction = min(1.0, options.sample_size / max(rows, 1))
    sample = (
        emb_df.select(UID, EMBEDDING_COLUMN)
        .mapInArrow(_sample_worker(options.seed, fraction), f"{UID} string, {EMBEDDING_COLUMN} binary")
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


def assign_all(context: StageContext, emb_df, centroids: np.ndarray, device: str):
    """(uid, cluster, centroid_similarity) of every row: the nearest centroid by cosine."""
    centroids_broadcast = context.broadcast(centroids)
    return emb_df.select(UID, EMBEDDING_COLUMN).mapInArrow(
        _assign_worker(centroids_broadcast, device), f"{UID} string, {CLUSTER} int, {CENTROID_SIMILARITY} float"
    )


def _kmeans_record(result, sample_rows: int, options) -> dict:
    return {
        "k": int(result.centroids.shape[0]), "sample_rows": sample_rows,
        "max_points_per_centroid": result.max_points_per_centroid, "iterations": result.iterations,
        "objective": result.objective[-1] if result.objective else None, "seed": result.seed,
        "threads": options.threads, "device": result.device, "init": result.init,
    }


def _without_rows(df, columns: dict[str, str]) -> StageOutput:
    """The output of an empty input (every row was dropped upstream): no rows, the stage's columns added."""
    from pyspark.sql import functions as F

    for name, kind in columns.items():
        df = df.withColumn(name, F.lit(None).cast(kind))
    return StageOutput(rows=untagged(df), columns=df.columns)


def _cluster_sizes(assigned) -> pa.Table:
    counts = assigned.groupBy(CLUSTER).count().toArrow().sort_by(CLUSTER)
    return pa.table({CLUSTER: counts.column(CLUSTER), "size": counts.column("count")})


def run_cluster(context: StageContext) -> StageOutput:
    """Rows gain `cluster` and `centroid_similarity`; artifacts centroids.npy, cluster_sizes.parquet and
    assignments/ (uid, cluster, centroid_similarity)."""
    options = context.typed
    df = context.read_rows()
    data_columns = [c for c in df.columns if c not in (CLUSTER, CENTROID_SIMILARITY)]
    rows_in = context.rows_in
    if rows_in == 0:
        return _without_rows(df, {CLUSTER: "int", CENTROID_SIMILARITY: "float"})
    emb_df = with_embeddings(context.spark, df.select(UID), context.input_dir)
    result, sample_rows = fit_centroids(emb_df, rows_in, options)
    assigned = assign_all(context, emb_df, result.centroids, options.device).localCheckpoint()
    np.save(context.artifact(Artifact.CENTROIDS), result.centroids)
    pq.write_table(_cluster_sizes(assigned), context.artifact(Artifact.CLUSTER_SIZES))
    assigned.write.parquet(str(context.artifact(Artifact.ASSIGNMENTS)))
    return StageOutput(rows=untagged(df.select(*data_columns).join(assigned, UID)),
                       columns=[*data_columns, CLUSTER, CENTROID_SIMILARITY],
                       record={"kmeans": _kmeans_record(result, sample_rows, options)})


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


def run_semdedup(context: StageContext) -> StageOutput:
    """SemDeDup inside the clusters of an upstream cluster stage: drop a member whose cosine similarity to an
    earlier member (in decreasing distance to the centroid) exceeds 1 - eps. With `target_keep_fraction`, eps is
    chosen from every member's similarity so that this fraction is kept. Ledger: semantic_duplicate with the kept
    uid the member resolves to, its cluster and similarity."""
    from pyspark.sql import functions as F

    options = context.typed
    target_keep_fraction, block_rows = options.target_keep_fraction, options.block_rows
    df = context.read_rows()
    if CLUSTER not in df.columns or CENTROID_SIMILARITY not in df.columns:
        raise ValueError(f"{context.input_dir} rows have no {CLUSTER}/{CENTROID_SIMILARITY}: run the cluster stage "
                         "first")
    rows_in = context.rows_in
    similarities = (
        with_embeddings(context.spark, df.select(UID, CLUSTER, CENTROID_SIMILARITY), context.input_dir)
        .groupBy(CLUSTER).applyInArrow(_similarity_worker(block_rows), _SIMILARITY_SCHEMA)
        .localCheckpoint()
    )
    if target_keep_fraction is None:
        # A float even when the YAML gives an integer: the ledger detail writes it as one.
        eps = float(options.eps)
    elif rows_in == 0:
        eps = semdedup_ops.DEFAULT_EPS
    else:
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
    return StageOutput(rows=tagged, columns=data_columns, record={"semdedup": {
        "eps": eps, "threshold": 1.0 - eps,
        "eps_from": "target_keep_fraction" if target_keep_fraction is not None else "eps",
        "target_keep_fraction": target_keep_fraction, "block_rows": block_rows,
    }})


# ---------------------------------------------------------------------------------------------------- prune


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


def run_prune(context: StageContext) -> StageOutput:
    """Density-based pruning: re-cluster, score each cluster's complexity C_j = d_inter * d_intra, give it the quota
    N_j from P_j = softmax(C_j / tau) by water-filling, keep its N_j selected members (`hard`: farthest from the
    centroid). Ledger: pruned_dense_cluster with cluster, rank and quota; artifact pruning_clusters.parquet."""
    from pyspark.sql import functions as F

    options = context.typed
    # Floats even when the YAML gives integers: the record writes them as such.
    tau, ratio = float(options.tau), float(options.ratio)
    df = context.read_rows()
    rows_in = context.rows_in
    n_keep = prune_ops.keep_fraction_count(rows_in, options.keep_fraction, options.keep_count)
    if rows_in == 0:
        return _without_rows(df, {"prune_cluster": "int"})
    emb_df = with_embeddings(context.spark, df.select(UID), context.input_dir)
    result, sample_rows = fit_centroids(emb_df, rows_in, options)
    assigned = assign_all(context, emb_df, result.centroids, options.device).localCheckpoint()
    k = result.centroids.shape[0]
    stats = assigned.groupBy(CLUSTER).applyInArrow(
        _cluster_statistics, f"{CLUSTER} int, size long, d_intra double"
    ).toArrow().sort_by(CLUSTER)
    sizes = np.zeros(k, dtype=np.int64)
    d_intra = np.zeros(k, dtype=np.float64)
    sizes[stats.column(CLUSTER).to_numpy()] = stats.column("size").to_numpy()
    d_intra[stats.column(CLUSTER).to_numpy()] = stats.column("d_intra").to_numpy()
    table = prune_ops.pruning_table(sizes, d_intra, result.centroids, n_keep, tau=tau, ratio=ratio)
    quotas_broadcast = context.broadcast(np.asarray(table["quota"]))
    selected = assigned.groupBy(CLUSTER).applyInArrow(
        _selection_worker(quotas_broadcast, options.selection, options.seed),
        f"{UID} string, _keep boolean, _rank long, _quota long",
    )
    joined = df.join(assigned.select(UID, F.col(CLUSTER).alias("prune_cluster")), UID).join(selected, UID)
    dropped = ~F.col("_keep")
    detail = F.to_json(F.struct(F.col("prune_cluster").alias("cluster"), F.col("_rank").alias("rank"),
                                F.col("_quota").alias("quota")))
    tagged = drop_where(untagged(joined), dropped, "prune", Reason.PRUNED_DENSE_CLUSTER, detail=detail)
    data_columns = [c for c in df.columns if c != "prune_cluster"] + ["prune_cluster"]
    np.save(context.artifact(Artifact.PRUNE_CENTROIDS), result.centroids)
    pq.write_table(pa.table({name: np.asarray(values) for name, values in table.items()}),
                   context.artifact(Artifact.PRUNING_CLUSTERS))

    def check_quotas_kept(written_dir: Path, rows_out: int, drops: dict[str, int]) -> dict:
        if rows_out != n_keep:
            raise RuntimeError(f"prune kept {rows_out} rows, the quotas say {n_keep}")
        return {}

    return StageOutput(
        rows=tagged, columns=data_columns, after_write=check_quotas_kept,
        record={"kmeans": _kmeans_record(result, sample_rows, options),
                "prune": {"n_keep": n_keep, "keep_fraction": options.keep_fraction, "keep_count": options.keep_count,
                          "tau": tau, "ratio": ratio, "selection": options.selection,
                          "empty_clusters": int((sizes == 0).sum())}},
    )
