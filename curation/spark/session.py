"""The SparkSession used by every stage: the active one (spark-submit, a notebook) or a local one."""

import logging
import os
import sys

logger = logging.getLogger(__name__)

DEFAULT_MASTER = "local[*]"

# Spark's own _SUCCESS file would race ours (written last, after the stage record); its console progress bar
# would interleave with our progress logging; the UI port is useless in batch jobs and tests.
_DEFAULT_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.driver.memory": "2g",
}

# Settings every stage relies on, so they are applied to an already-active session too. Spark's Arrow bridge has no
# float16, so vectors travel as binary values; with 32-bit offsets one Arrow array of them (a SemDeDup cluster, a
# k-means sample) stops at 2 GiB, about 2.1M rows at d = 512. Large var types give every string and binary
# column int64 offsets: workers receive large_string/large_binary and applyInArrow must return those types.
REQUIRED_CONF = {"spark.sql.execution.arrow.useLargeVarTypes": "true"}


def prepare_environment() -> None:
    """Workers must run this interpreter (the venv's), and a local master must bind to loopback."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def get_spark(master: str | None = None, conf: dict | None = None, app_name: str = "curation"):
    """The active SparkSession if there is one, else a new one (local[*] unless `master` says otherwise).

    Under spark-submit the master and resources come from spark-submit, so `master` is ignored there.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        apply_required_conf(active)
        return active
    prepare_environment()
    builder = SparkSession.builder.appName(app_name)
    launched_by_spark_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    if not launched_by_spark_submit:
        builder = builder.master(master or os.environ.get("CURATION_SPARK_MASTER", DEFAULT_MASTER))
    defaults = {**_DEFAULT_CONF, **REQUIRED_CONF}
    if not launched_by_spark_submit:
        # Spark's 200 shuffle partitions cost a Python worker hand-off each; a local session has a few cores.
        defaults["spark.sql.shuffle.partitions"] = str(max(4, 2 * (os.cpu_count() or 2)))
    for key, value in {**defaults, **(conf or {})}.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    apply_required_conf(spark)
    spark.sparkContext.setLogLevel(os.environ.get("CURATION_SPARK_LOG_LEVEL", "ERROR"))
    logger.info("Spark %s session on %s", spark.version, spark.sparkContext.master)
    return spark


def apply_required_conf(spark) -> None:
    """Set REQUIRED_CONF on `spark` (runtime SQL settings: they take effect for the next query)."""
    for key, value in REQUIRED_CONF.items():
        if spark.conf.get(key, None) != value:
            logger.info("setting %s=%s on the Spark session", key, value)
            spark.conf.set(key, value)
