import os
import sys

import pytest

from curation.spark.session import get_spark
from tests.demo_stages import demo_run_config, write_demo_inputs


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
    from curation.demo_images import demo_resolver
    from curation.image_server import ImageServer
    from curation.pipeline import run_pipeline
    from curation.stages import parse_run_config

    root = tmp_path_factory.mktemp("demo_run")
    with ImageServer(demo_resolver(seed=0)) as server:
        write_demo_inputs(root, 1_500, server.port)
        config = parse_run_config(demo_run_config(root, "demo-run", server.port, {"partitions": 2}))
        run_pipeline(spark, config, root / "run")
    return root / "run"
