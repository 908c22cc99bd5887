"""The semdedup stage."""

from curation.stage import RateAssumption, Stage, StageOptions, option


class SemdedupStage(Stage):
    name = "semdedup"
    flow = 150
    summary = "SemDeDup inside the clusters of a cluster stage"
    input_help = "stage folder of a cluster stage (or after it)"
    drops_depend_on = "duplicates"
    description = (
        "SemDeDup (Abbas et al. 2023) inside each cluster: members in decreasing distance to the centroid (ties by "
        "uid), member j dropped if its cosine similarity to any earlier member, kept or not, exceeds 1 - eps; one "
        "shuffle of the vectors by cluster, sorted into that order and streamed through an on-disk memmap, "
        "similarities in blocks (memory O(block_rows * d + block_rows^2), not O(cluster)); a cluster over "
        "`max_cluster_rows` is split by a sub-k-means and SemDeDup runs inside each part; `target_keep_fraction` "
        "picks eps from every member's largest similarity to an earlier one; adds `semdedup_max_similarity`"
    )
    drops = (
        "`semantic_duplicate` (related_uid: the kept member it resolves to; detail: cluster, part when "
        "the cluster was split, group, similarity, eps)"
    )

    class Options(StageOptions):
        eps: float = option(
            0.07,
            "drop a member whose cosine similarity to an earlier member of its cluster exceeds 1 - eps",
            above=0,
            below=2,
        )
        target_keep_fraction: float | None = option(
            None,
            "choose eps so that this fraction of the rows is kept (instead of eps)",
            above=0,
            at_most=1,
        )
        block_rows: int = option(
            2048, "rows per similarity block: memory is O(block_rows^2), not O(cluster^2)", at_least=1
        )

        max_cluster_rows: int = option(
            100_000,
            "a larger cluster is split by a sub-k-means into ceil(size / this) parts and SemDeDup runs inside each "
            "part: a part costs about this^2 * d flops",
            at_least=2,
        )
        seed: int | None = option(None, "seed of the sub-k-means that splits a cluster over max_cluster_rows",
                                  from_run=True)

    assumed_rate = RateAssumption(
        60_000,
        "rows/s",
        "blocked similarities within clusters (bench/results/semdedup.json when present)",
    )
    adapter = "curation.spark.semantic:run_semdedup"

    def survival(self, options: dict) -> tuple[float, str]:
        if options["target_keep_fraction"] is not None:
            return float(options["target_keep_fraction"]), "exact: target_keep_fraction"
        return super().survival(options)


STAGE = SemdedupStage()
