"""Spark adapters of the embedding stages (DESIGN.md section 4): cluster, semdedup (SemDeDup, Abbas et al. 2023) and
prune (density-based pruning, Abbas et al., ICLR 2024).

Embeddings come from the nearest upstream embed stage (image embeddings, joined to the rows by uid). k-means is fit
on the driver, through the FAISS seam (GPU when present), on a uniform sample chosen by u(seed, uid) and sorted by
uid, with a fixed seed, thread count and `max_points_per_centroid` = ceil(sample / k) so that faiss trains on the
whole sample: the centroids depend on the rows, never on partitioning. Every row is then assigned in a
distributed pass with the centroids broadcast. SemDeDup shuffles the vectors once by (cluster, part), sorts them
into SemDeDup order and streams each part through an on-disk memmap (no worker holds a cluster's vectors); choosing
the kept members (uids and floats only) and pruning's selection are one `applyInArrow` group per cluster or part.

Vectors travel as packed float16 in large_binary values (the session enables Arrow large var types): a binary
Arrow array has 32-bit offsets and stops at 2 GiB, about 2.1M rows at d = 512.
"""

import logging
import math
import os
import tempfile
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
    # The packed copy is as large as the vectors (7.5 GiB for the 3.9e6 rows k = 1e5 needs): free it before the fit.
    del sample
    k = min(options.k, len(vectors))
    if k < 1:
        raise ValueError("no rows to cluster")
    if k < options.k:
        logger.warning("k = %d exceeds the %d sampled rows: using k = %d", options.k, len(vectors), k)
    result = faiss_seam.fit_spherical_kmeans(
        vectors, k, iterations=options.iterations, seed=options.seed, threads=options.threads,
        device=options.device, init=options.init,
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
    record = {
        "k": int(result.centroids.shape[0]), "sample_rows": sample_rows,
        "max_points_per_centroid": result.max_points_per_centroid, "iterations": result.iterations,
        "objective": result.objective[-1] if result.objective else None, "seed": result.seed,
        "threads": options.threads, "device": result.device, "init": result.init,
    }
    if result.levels == 2:
        # Only a two-level fit adds keys: a flat fit's record (the demo's) stays as it was.
        record["two_level"] = {
            "coarse_k": int(result.coarse.centroids.shape[0]), "coarse_iterations": result.coarse.iterations,
            "coarse_objective": result.coarse.objective[-1] if result.coarse.objective else None,
            "fit_objective": result.objective[0], "refine_passes": result.refine_passes,
            "refine_probes": result.refine_probes,
        }
    return record


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

PART = "_part"
SPLIT_SAMPLE_PURPOSE = "semdedup_split_sample"
# Rows per part the sub-k-means of an over-cap cluster is fit on: faiss's own default max_points_per_centroid.
_SPLIT_SAMPLE_ROWS_PER_PART = 256
_SIMILARITY_SCHEMA = f"{UID} string, {CLUSTER} int, {PART} int, _order long, _max_sim float, _earlier long"


def _large_strings(table: pa.Table) -> pa.Table:
    """`table` with string columns as large_string: with spark.sql.execution.arrow.useLargeVarTypes (session.py)
    applyInArrow refuses a returned string column."""
    return table.cast(pa.schema([pa.field(f.name, pa.large_string()) if f.type == pa.string() else f
                                 for f in table.schema]))


def _split_sample_worker(seed: int, fractions: dict[int, float]):
    """The rows of over-cap clusters drawn for their sub-k-means, u(seed, uid) < the cluster's fraction."""

    def run(batches):
        for batch in batches:
            thresholds = np.array([fractions.get(c, 0.0) for c in batch.column(CLUSTER).to_pylist()], np.float64)
            draws = uniform(seed, batch.column(UID), SPLIT_SAMPLE_PURPOSE)
            yield batch.filter(pa.array(draws < thresholds))

    return run


def fit_parts(emb_df, oversized: dict[int, int], cap: int, seed: int) -> dict[int, np.ndarray]:
    """{cluster: unit centroids of its ceil(m / cap) parts} for every over-cap cluster (`oversized`: its size m).

    A sub-k-means puts near-copies in one part, where SemDeDup still compares them, except for pairs that straddle
    a part boundary: those are no longer compared, so a split only ever keeps more members than SemDeDup of the
    whole cluster (bench/bench_semdedup_large.py measures how many). Each cluster's k-means is fit on a u(seed, uid)
    sample of about 256 rows per part, sorted by uid, with a fixed seed and one thread: the parts
    depend on the rows only. The driver holds the samples, sum(parts) * 256 rows, and loops over the split
    clusters only (at most k)."""
    from curation.gpu import faiss_seam

    parts = {cluster: math.ceil(size / cap) for cluster, size in oversized.items()}
    fractions = {cluster: min(1.0, parts[cluster] * _SPLIT_SAMPLE_ROWS_PER_PART / size)
                 for cluster, size in oversized.items()}
    sample = (
        emb_df.select(UID, CLUSTER, EMBEDDING_COLUMN)
        .mapInArrow(_split_sample_worker(seed, fractions), f"{UID} string, {CLUSTER} int, {EMBEDDING_COLUMN} binary")
        .toArrow()
        .sort_by([(CLUSTER, "ascending"), (UID, "ascending")])
    )
    clusters = sample.column(CLUSTER).to_numpy()
    centroids = {}
    for cluster, count in sorted(parts.items()):
        vectors = embedding_ops.unpack(sample.column(EMBEDDING_COLUMN).filter(pa.array(clusters == cluster)))
        count = min(count, len(vectors))
        result = faiss_seam.spherical_kmeans(vectors, count, seed=seed, max_points_per_centroid=math.ceil(
            len(vectors) / count), threads=1, device="cpu")
        centroids[cluster] = result.centroids
    return centroids


def _part_worker(centroids_broadcast):
    """Rows gain PART: for a split cluster the part whose centroid is most similar, else null."""

    def run(batches):
        part_centroids = centroids_broadcast.value
        for batch in batches:
            clusters = batch.column(CLUSTER).to_numpy(zero_copy_only=False)
            parts = np.zeros(len(batch), dtype=np.int32)
            split = np.isin(clusters, list(part_centroids))
            for cluster in np.unique(clusters[split]).tolist():
                members = np.flatnonzero(clusters == cluster)
                vectors = embedding_ops.unpack(batch.column(EMBEDDING_COLUMN).take(pa.array(members)))
                parts[members] = semdedup_ops.nearest_centroid(vectors, part_centroids[cluster])
            yield pa.RecordBatch.from_arrays(
                [*batch.columns, pa.array(parts, mask=~split)], names=[*batch.schema.names, PART]
            )

    return run


def _streamed_similarity_worker(block_rows: int):
    """Rows arrive sorted by (cluster, part, centroid_similarity, uid): each (cluster, part) in SemDeDup order,
    one after another. Each part's unit vectors go to a StreamedSimilarity (an np.memmap under the executor's local
    dir), which yields max_sim/earlier a block at a time, so a worker holds O(block_rows * d + block_rows^2) floats
    and the part's uids, never the part's vectors."""

    def run(batches):
        directory = (os.environ.get("SPARK_LOCAL_DIRS") or tempfile.gettempdir()).split(",")[0]
        group, stream, uids, previous = None, None, [], None
        try:
            for batch in batches:
                keys = list(zip(batch.column(CLUSTER).to_pylist(), batch.column(PART).to_pylist(), strict=True))
                similarity = batch.column(CENTROID_SIMILARITY).to_numpy(zero_copy_only=False)
                batch_uids = batch.column(UID).to_pylist()
                vectors = embedding_ops.unpack(batch.column(EMBEDDING_COLUMN))
                start = 0
                while start < len(keys):
                    end = start + 1
                    while end < len(keys) and keys[end] == keys[start]:
                        end += 1
                    if keys[start] != group:
                        if stream is not None:
                            yield from _similarity_batches(group, uids, stream.finish())
                            stream.close()
                        group, uids, previous = keys[start], [], None
                        stream = semdedup_ops.StreamedSimilarity(vectors.shape[1], directory, block_rows)
                    run_uids = batch_uids[start:end]
                    _check_semdedup_order(similarity[start:end], run_uids, previous)
                    previous = (similarity[end - 1], run_uids[-1])
                    rows = vectors[start:end]
                    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
                    uids.extend(run_uids)
                    yield from _similarity_batches(group, uids, stream.add(rows))
                    start = end
            if stream is not None:
                yield from _similarity_batches(group, uids, stream.finish())
        finally:
            if stream is not None:
                stream.close()

    return run


def _check_semdedup_order(similarity: np.ndarray, uids: list[str], previous) -> None:
    """Spark's sort must have produced semdedup_order: a mismatch (a float or string ordering that differs) would
    silently change which copy of a duplicate is kept."""
    if previous is not None:
        similarity = np.concatenate([np.array([previous[0]], dtype=similarity.dtype), similarity])
        uids = [previous[1], *uids]
    if not np.array_equal(semdedup_ops.semdedup_order(similarity, uids), np.arange(len(uids))):
        raise RuntimeError("rows did not arrive in SemDeDup order (centroid similarity, then uid)")


def _similarity_batches(group, uids: list[str], blocks):
    cluster, part = group
    for start, max_sim, earlier in blocks:
        count = len(max_sim)
        yield pa.RecordBatch.from_arrays([
            pa.array(uids[start : start + count], pa.large_string()),
            pa.array(np.full(count, cluster, np.int32)),
            pa.array(np.full(count, 0 if part is None else part, np.int32), mask=np.full(count, part is None)),
            pa.array(np.arange(start, start + count, dtype=np.int64)),
            pa.array(np.where(np.isfinite(max_sim), max_sim, np.nan).astype(np.float32), from_pandas=True),
            pa.array(earlier, mask=earlier < 0),
        ], names=[UID, CLUSTER, PART, "_order", "_max_sim", "_earlier"])


def _resolve_worker(threshold: float):
    """Per (cluster, part), given the eps-free similarities: which members are kept and the kept member each drop
    joins."""

    def run(table: pa.Table) -> pa.Table:
        table = table.sort_by("_order")
        uids = table.column(UID).to_pylist()
        earlier = table.column("_earlier").fill_null(-1).to_numpy().astype(np.int64)
        max_sim = table.column("_max_sim").to_numpy(zero_copy_only=False).astype(np.float32)
        max_sim = np.where(np.isnan(max_sim), -np.inf, max_sim).astype(np.float32)
        keep, kept_index = semdedup_ops.resolve_kept(max_sim, earlier, threshold)
        return _large_strings(pa.table({
            UID: table.column(UID),
            "_keep": pa.array(keep),
            "_kept_uid": pa.array([uids[i] for i in kept_index.tolist()], pa.string()),
        }))

    return run


def _split_record(similarities, oversized: dict[int, int], cap: int) -> dict:
    """What the stage record says about split clusters: the cap, and per split cluster its size and part sizes."""
    from pyspark.sql import functions as F

    counts = (similarities.filter(F.col(PART).isNotNull()).groupBy(CLUSTER, PART).count().toArrow()
              .sort_by([(CLUSTER, "ascending"), (PART, "ascending")]))
    part_sizes: dict[int, list[int]] = {cluster: [] for cluster in oversized}
    for cluster, count in zip(counts.column(CLUSTER).to_pylist(), counts.column("count").to_pylist(), strict=True):
        part_sizes[cluster].append(count)
    return {"max_cluster_rows": cap, "clusters": [
        {"cluster": cluster, "size": size, "parts": len(part_sizes[cluster]), "part_sizes": part_sizes[cluster]}
        for cluster, size in sorted(oversized.items())
    ]}


def semdedup_similarities(emb_df, block_rows: int, cap: int, seed: int, broadcast):
    """(checkpointed DataFrame of uid, cluster, PART, _order, _max_sim, _earlier; {cluster: size} of the clusters
    over `cap`, which were split) for `emb_df`'s rows (uid, cluster, centroid_similarity, packed embedding).

    The vectors are shuffled once, by (cluster, part), and sorted within partitions into SemDeDup order; one pass
    then streams each part through an on-disk memmap (`_streamed_similarity_worker`). `broadcast` ships a value to
    the executors (StageContext.broadcast)."""
    from pyspark.sql import functions as F

    sizes = emb_df.groupBy(CLUSTER).count().filter(F.col("count") > cap).toArrow()
    oversized = dict(zip(sizes.column(CLUSTER).to_pylist(), sizes.column("count").to_pylist(), strict=True))
    if oversized:
        centroids = fit_parts(emb_df, oversized, cap, seed)
        logger.info("semdedup: %d cluster(s) over %d rows split into %d parts", len(oversized), cap,
                    sum(len(c) for c in centroids.values()))
        parted = emb_df.mapInArrow(_part_worker(broadcast(centroids)),
                                   f"{UID} string, {CLUSTER} int, {CENTROID_SIMILARITY} float, "
                                   f"{EMBEDDING_COLUMN} binary, {PART} int")
    else:
        parted = emb_df.withColumn(PART, F.lit(None).cast("int"))
    similarities = (
        parted.repartition(CLUSTER, PART).sortWithinPartitions(CLUSTER, PART, CENTROID_SIMILARITY, UID)
        .mapInArrow(_streamed_similarity_worker(block_rows), _SIMILARITY_SCHEMA)
        .localCheckpoint()
    )
    return similarities, oversized


def resolved_decisions(similarities, eps: float):
    """uid, _keep, _kept_uid of every row of `semdedup_similarities` at this eps."""
    return similarities.groupBy(CLUSTER, PART).applyInArrow(
        _resolve_worker(1.0 - eps), f"{UID} string, _keep boolean, _kept_uid string"
    )


def run_semdedup(context: StageContext) -> StageOutput:
    """SemDeDup inside the clusters of an upstream cluster stage: drop a member whose cosine similarity to an
    earlier member (in decreasing distance to the centroid) exceeds 1 - eps. With `target_keep_fraction`, eps is
    chosen from every member's similarity so that this fraction is kept. A cluster over `max_cluster_rows` is split
    by a sub-k-means into ceil(m / max_cluster_rows) parts, and SemDeDup runs inside each part. Ledger:
    semantic_duplicate with the kept uid the member resolves to, its cluster (and part when split) and similarity."""
    from pyspark.sql import functions as F

    options = context.typed
    target_keep_fraction, block_rows, cap = options.target_keep_fraction, options.block_rows, options.max_cluster_rows
    df = context.read_rows()
    if CLUSTER not in df.columns or CENTROID_SIMILARITY not in df.columns:
        raise ValueError(f"{context.input_dir} rows have no {CLUSTER}/{CENTROID_SIMILARITY}: run the cluster stage "
                         "first")
    rows_in = context.rows_in
    emb_df = with_embeddings(context.spark, df.select(UID, CLUSTER, CENTROID_SIMILARITY), context.input_dir)
    similarities, oversized = semdedup_similarities(emb_df, block_rows, cap, options.seed, context.broadcast)
    if target_keep_fraction is None:
        # A float even when the YAML gives an integer: the ledger detail writes it as one.
        eps = float(options.eps)
    elif rows_in == 0:
        eps = semdedup_ops.DEFAULT_EPS
    else:
        values = similarities.select("_max_sim").toArrow().column(0).to_numpy(zero_copy_only=False)
        eps = semdedup_ops.eps_for_keep_fraction(np.where(np.isnan(values), -np.inf, values), target_keep_fraction)
        logger.info("semdedup: eps = %.6g keeps %.3f of the rows", eps, target_keep_fraction)
    decisions = resolved_decisions(similarities, eps)
    joined = df.join(similarities.select(UID, PART, "_max_sim"), UID).join(decisions, UID)
    dropped = ~F.col("_keep")
    # PART is null in an unsplit cluster, and to_json leaves null fields out: its detail is as before splitting.
    detail = F.to_json(F.struct(F.col(CLUSTER).alias("cluster"), F.col(PART).alias("part"),
                                F.col("_kept_uid").alias("group"), F.col("_max_sim").alias("similarity"),
                                F.lit(eps).alias("eps")))
    tagged = drop_where(untagged(joined.withColumn("semdedup_max_similarity", F.col("_max_sim"))), dropped,
                        "semdedup", Reason.SEMANTIC_DUPLICATE, F.col("_kept_uid"), detail)
    data_columns = [c for c in df.columns if c != "semdedup_max_similarity"] + ["semdedup_max_similarity"]
    record = {
        "eps": eps, "threshold": 1.0 - eps,
        "eps_from": "target_keep_fraction" if target_keep_fraction is not None else "eps",
        "target_keep_fraction": target_keep_fraction, "block_rows": block_rows,
    }
    if oversized:
        record["split"] = _split_record(similarities, oversized, cap)
    return StageOutput(rows=tagged, columns=data_columns, record={"semdedup": record})


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
