import os
import sys

import pytest

from curation.spark.session import get_spark
from tests.demo_stages import demo_stage_options


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run (start-up costs ~8 s)."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = get_spark(master="local[2]", conf={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    yield session
    session.stop()


# The whole pipeline on a small demo corpus, for the tests that read a finished run folder (report, inspect).
DEMO_RUN_STAGES = [
    ("ingest", {"keep_columns": ["WIDTH", "HEIGHT"], "blocked_urls_file": "{requests}/blocked_urls.txt"}),
    ("dedup_exact", {}),
    ("dedup_text", {}),
    ("match", {}),
    ("count", {}),
    ("balance", {"t": 20}),
    ("download", {"image_size": 64, "resize_mode": "keep_ratio", "shard_rows": 300, "thread_count": 8}),
    ("embed", {"model": "tiny-clip", "pretrained": "random", "device": "cpu", "num_workers": 0, "batch_size": 64}),
    ("dedup_image", {}),
    ("block_images", {"phash_file": "{requests}/blocked_image_phashes.txt"}),
    ("decontaminate", {"eval_images": "{requests}/eval_images", "use_embeddings": "never"}),
    ("filter", {"min_image_side": 100, "max_caption_words": 20, "max_caption_repeats": 5}),
    ("nsfw", {"max_score": 0.9, "threads": 1}),
    ("cluster", {"k": 8, "threads": 1, "device": "cpu"}),
    ("semdedup", {"target_keep_fraction": 0.9}),
    ("prune", {"k": 4, "keep_fraction": 0.8, "threads": 1, "device": "cpu"}),
    ("count", {}),
    ("balance", {"t": 10}),
    ("logo_bank", {"q": 0.02, "duplicate_similarity": 0.998}),
    ("mine_logos", {"models": ["toy"], "probe_count": 8, "max_logos": 6, "logo_block": 2, "device": "cpu"}),
    ("flag_logos", {"policy": "drop", "min_spuriousness": -1.0, "top": 1, "threshold": 0.999}),
    ("publish", {"shard_rows": 400}),
]


@pytest.fixture(scope="session")
def demo_run(spark, tmp_path_factory):
    """A finished run folder of every demo stage over a 1,500-row demo corpus (images from a 127.0.0.1 server),
    with the demo's blocklists and evaluation set, and balancing again after the image stages."""
    from curation.config import parse_run_config
    from curation.demo import generate_demo_corpus, write_demo_requests
    from curation.demo_images import demo_resolver
    from curation.image_server import ImageServer
    from curation.ops.metadata import build_metadata, write_metadata
    from curation.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("demo_run")
    entries, _ = build_metadata(wordfreq_top_n=20_000, wordnet_dir=None)
    write_metadata(root / "metadata.json", entries)
    with ImageServer(demo_resolver(seed=0)) as server:
        generate_demo_corpus(root / "corpus", entries, rows=1_500, shards=2, seed=3, image_port=server.port)
        write_demo_requests(root / "requests", rows=1_500, seed=0, image_port=server.port)
        stages = [{name: demo_stage_options(name, options, server.port, root / "requests")}
                  for name, options in DEMO_RUN_STAGES]
        config = parse_run_config({"name": "demo-run", "input": str(root / "corpus"),
                                   "metadata": str(root / "metadata.json"), "seed": 0,
                                   "spark": {"partitions": 2}, "stages": stages})
        run_pipeline(spark, config, root / "run")
    return root / "run"
