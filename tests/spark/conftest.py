import os
import sys

import pytest

from curation.spark.session import get_spark
from tests.demo_stages import DEMO_STAGES, demo_stage_options


@pytest.fixture(scope="session")
def spark():
    """One local[2] session for the whole test run (start-up costs ~8 s)."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = get_spark(master="local[2]", conf={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    yield session
    session.stop()


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
                  for name, options in DEMO_STAGES]
        config = parse_run_config({"name": "demo-run", "input": str(root / "corpus"),
                                   "metadata": str(root / "metadata.json"), "seed": 0,
                                   "spark": {"partitions": 2}, "stages": stages})
        run_pipeline(spark, config, root / "run")
    return root / "run"
