"""The prune stage."""

from curation.stage import RateAssumption, Stage, exactly_one, option
from curation.stages.cluster import KMeansOptions


class PruneStage(Stage):
    name = "prune"
    flow = 160
    summary = "density-based pruning over concept clusters"
    input_help = "stage folder downstream of embed"
    description = (
        "density-based pruning (Abbas et al., ICLR 2024): re-cluster into k concept clusters; d_intra = mean(1 - cos "
        "to centroid), d_inter = mean (1 - cos) to the min(20, k - 1) nearest other centroids, C = d_inter * d_intra, "
        "P = softmax(C / tau); quotas by exact water-filling within [min(floor(ratio * N_keep / k), size), size] and "
        "largest-remainder rounding so the total is exactly N_keep; each cluster keeps its N_j hardest members "
        "(farthest from the centroid; `easy`, `random` as options); adds `prune_cluster`; artifacts "
        "`pruning_clusters.parquet` (size, d_intra, d_inter, complexity, probability, lower bound, quota), "
        "`prune_centroids.npy`"
    )
    drops = "`pruned_dense_cluster` (detail: cluster, rank, quota)"

    class Options(KMeansOptions):
        k: int = option(500, "number of concept clusters (500 in the paper for LAION)", at_least=1)
        keep_fraction: float | None = option(None, "fraction of the rows to keep (this or keep_count is required)")
        keep_count: int | None = option(None, "number of rows to keep")
        tau: float = option(0.1, "softmax temperature over cluster complexity")
        ratio: float = option(0.5, "each cluster keeps at least min(floor(ratio * N_keep / k), its size)")
        selection: str = option(
            "hard",
            "which members a cluster keeps: hard (farthest from the centroid), easy, random",
            choices=("hard", "easy", "random"),
        )

        def check(self) -> None:
            exactly_one("prune", self, ("keep_fraction", "keep_count"))

    assumed_rate = RateAssumption(80_000, "rows/s", "assignment and quotas, plus the k-means fit")
    adapter = "curation.spark.semantic:run_prune"
    estimated_by = "prune"

    def survival(self, options: dict) -> tuple[float, str]:
        if options["keep_fraction"] is not None:
            return float(options["keep_fraction"]), "exact: keep_fraction"
        return -1.0, "exact: keep_count"


STAGE = PruneStage()
