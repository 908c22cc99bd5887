"""Connected components of an edge DataFrame, computed on Spark (never collected to the driver).

Alternating large-star and small-star rounds (Kiveris et al., "Connected Components in MapReduce and Beyond",
SoCC 2014) turn every component into a star around its smallest node in O(log^2 n) rounds. Each round is a
couple of shuffles; rounds are checkpointed locally so the lineage stays short.
"""

import logging

logger = logging.getLogger(__name__)

MAX_ROUNDS = 64


def _large_star(edges):
    from pyspark.sql import functions as F

    both = edges.select("u", "v").union(edges.select(F.col("v").alias("u"), F.col("u").alias("v")))
    smallest = both.groupBy("u").agg(F.least(F.min("v"), F.col("u")).alias("m"))
    return (
        both.filter(F.col("v") > F.col("u"))
        .join(smallest, "u")
        .select(F.col("v").alias("u"), F.col("m").alias("v"))
        .distinct()
    )


def _small_star(edges):
    from pyspark.sql import functions as F

    oriented = edges.select(F.greatest("u", "v").alias("u"), F.least("u", "v").alias("v")).distinct()
    smallest = oriented.groupBy("u").agg(F.min("v").alias("m"))
    to_smallest = (
        oriented.join(smallest, "u")
        .filter(F.col("v") != F.col("m"))
        .select(F.col("v").alias("u"), F.col("m").alias("v"))
    )
    return to_smallest.union(smallest.select("u", F.col("m").alias("v"))).distinct()


def connected_components(edges, a: str = "a", b: str = "b"):
    """DataFrame (node, root): every node that has an edge, with the smallest node of its component as root."""
    from pyspark.sql import functions as F

    current = (
        edges.filter(F.col(a) != F.col(b)).select(F.col(a).alias("u"), F.col(b).alias("v")).localCheckpoint()
    )
    for round_number in range(1, MAX_ROUNDS + 1):
        following = _small_star(_large_star(current)).localCheckpoint()
        changed = following.exceptAll(current).limit(1).count() + current.exceptAll(following).limit(1).count()
        current = following
        if not changed:
            logger.info("connected components converged after %d rounds", round_number)
            break
    else:
        raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    # A converged star: every edge is (node, root) with root the component's smallest node.
    members = current.select(F.col("u").alias("node"), F.col("v").alias("root"))
    roots = current.select(F.col("v").alias("node"), F.col("v").alias("root"))
    return members.union(roots).distinct()
