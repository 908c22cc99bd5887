"""The cluster stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option


class KMeansOptions(StageOptions):
    """What the cluster and prune stages share: both fit spherical k-means on the image embeddings."""

    sample_size: int = option(
        500_000,
        "k-means is fit on the driver on a uniform sample (u(seed, uid)) of about this many; faiss wants at least "
        "39 rows per centroid, so k needs a sample of 39 k (k = 100,000: 3.9 million rows, 8 GiB at d = 512); "
        "fewer is logged as a warning",
        at_least=1,
    )
    iterations: int = option(20, "k-means iterations (faiss may stop earlier once converged)", at_least=1)
    threads: int = option(
        4, "faiss threads for the fit (fixed, so the centroids do not depend on the machine)", at_least=1
    )
    device: str = option("auto", "auto (GPU faiss when present), cuda or cpu", choices=("auto", "cuda", "cpu"))
    init: str = option(
        "random", "centroid seeding: random (faiss's, as SemDeDup) or kmeans++", choices=("random", "kmeans++")
    )
    seed: int | None = option(None, "seed of the sample draw and of faiss", from_run=True)


class ClusterStage(Stage):
    name = "cluster"
    flow = 140
    summary = "spherical k-means on the image embeddings; rows gain cluster"
    input_help = "stage folder downstream of embed"
    passes_all_rows = True
    description = (
        "spherical k-means (FAISS; GPU when present) on the image embeddings of the upstream embed stage: fit on the "
        "driver on a uniform sample by u(seed, uid), sorted by uid, with fixed seed, threads and "
        "`max_points_per_centroid` = ceil(sample / k) so faiss trains on the whole sample; above k = 4,096 the fit is "
        "two-level (ceil(sqrt(k)) coarse centroids, then fine ones within each coarse cluster in proportion to its "
        "rows: ~2 sqrt(k) instead of k sample-centroid products per row and iteration); every row assigned in a "
        "distributed pass with the centroids broadcast; adds `cluster`, `centroid_similarity`; artifacts "
        "`centroids.npy`, `cluster_sizes.parquet`, `assignments/`"
    )
    drops = "-"

    class Options(KMeansOptions):
        k: int = option(
            1000, "number of k-means clusters on the image embeddings (SemDeDup used 50,000 for 440M)", at_least=1
        )

    assumed_rate = RateAssumption(
        80_000,
        "rows/s",
        "assigning rows to centroids, plus the k-means fit (bench/results/semdedup.json when present)",
    )
    adapter = "curation.spark.semantic:run_cluster"
    estimated_by = "cluster"


STAGE = ClusterStage()
