import os
import sys

import pytest

from curation.spark.session import get_spark


@pytest.fixture(scope="session")
def spark():
    """The same local[2] session as tests/spark's fixture: `get_spark` returns the active session when the other
    fixture started it first, so one run never holds two."""
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = get_spark(master="local[2]", conf={"spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    yield session
    session.stop()
