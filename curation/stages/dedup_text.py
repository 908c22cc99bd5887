"""The dedup_text stage."""

from curation.stage import RateAssumption, Stage, StageOptions, check_with, option, partitions_option


class DedupTextStage(Stage):
    name = "dedup_text"
    flow = 30
    summary = "MinHash-LSH near-duplicate captions, exact-Jaccard verified"
    input_kind = "either"
    drops_depend_on = "duplicates"
    description = (
        "near-duplicate captions: datasketch-compatible MinHash over shingles (default char 5-grams after lowercasing "
        "and collapsing whitespace), LSH bands chosen so a pair at the threshold is a candidate with probability >= "
        "0.98 (128 permutations at 0.8: 17 bands x 7 rows, 0.982), a Spark shuffle on (band, band hash), candidates "
        "verified by their exact shingle Jaccard, groups by distributed connected components (large-star/small-star); "
        "per group `cap:K` keeps the K members with the smallest u(seed, uid), or `keep_one`, or `tag`; adds "
        "`text_dup_group` (the group's smallest uid) and `text_dup_group_size`"
    )
    drops = "`near_duplicate_caption` (related_uid: the group's first survivor; detail: group, size, rank, policy)"

    class Options(StageOptions):
        threshold: float = option(
            0.8, "exact shingle Jaccard at or above which two captions are near duplicates", above=0, below=1
        )
        shingles: str = option("char:5", "shingles: char:N (character N-grams) or word:N (word N-grams)")
        policy: str = option(
            "cap:10", "per group: cap:K keeps the K members with the smallest u(seed, uid); keep_one; tag"
        )
        num_perm: int = option(
            128, "MinHash permutations (bands x rows chosen so P(candidate at J = threshold) >= 0.98)"
        )
        seed: int | None = option(None, "seed of the MinHash permutations and of the keep draw", from_run=True)
        max_anchors: int = option(
            8, "in an LSH bucket larger than full_pairs_limit, members are paired with this many anchors"
        )
        full_pairs_limit: int = option(64, "LSH buckets up to this size are verified pair by pair")
        partitions: int | None = partitions_option()

        def check(self) -> None:
            from curation.ops.shingles import parse_shingle_spec
            from curation.ops.survivors import parse_policy

            check_with("dedup_text", lambda: parse_policy(self.policy))
            check_with("dedup_text", lambda: parse_shingle_spec(self.shingles))

    assumed_rate = RateAssumption(
        2_500,
        "rows/s",
        "MinHash-LSH with exact Jaccard checks (bench/results/dedup_text.json when present)",
    )
    adapter = "curation.spark.dedup:run_dedup_text"


STAGE = DedupTextStage()
