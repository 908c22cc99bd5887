"""The ingest stage."""

from pathlib import Path

from curation.io import fingerprint_files
from curation.stage import RateAssumption, Stage, StageOptions, option, partitions_option


class IngestStage(Stage):
    name = "ingest"
    flow = 10
    summary = "raw parquet shards -> uid, url, caption; bad rows to the ledger"
    input_help = "parquet files, folders or patterns (glob:PATTERN for full glob syntax; any pyarrow URI)"
    input_kind = "raw"
    description = (
        "reads parquet shards (files, folders, globs; local or any pyarrow URI: s3://, gs://, hdfs://), maps the "
        "columns of the common schemas (LAION `URL`/`TEXT`, img2dataset/CC3M `url`/`caption`, DataComp `url`/`text`), "
        "computes the uid, validates"
    )
    drops = (
        "`missing_url`, `empty_url`, `missing_caption`, `empty_caption`, `invalid_utf8`, `nul_character` (NUL "
        "separates url and caption in the uid), `not_http_url` (also a url with control characters, or one whose "
        "host urllib and the WHATWG URL Standard read differently), `caption_too_long`, `blocked_url`, "
        "`blocked_domain` (the optional blocklists), `duplicate_pair`"
    )

    class Options(StageOptions):
        url_column: str | None = option(
            None, "url column of the raw shards (detected: url, URL, Url, image_url)", default_text="detected"
        )
        text_column: str | None = option(
            None, "caption column (detected: caption, TEXT, text, txt, Caption, alt_text)", default_text="detected"
        )
        max_caption_chars: int = option(4096, "longer captions go to the ledger (caption_too_long)", at_least=1)
        keep_columns: list[str] = option([], "extra raw columns carried through to the release")
        skip_bad_files: bool = option(False, "record unreadable shards in the manifest and go on, instead of failing")
        blocked_domains_file: str | None = option(
            None,
            (
                "text file of domains, one a line: rows whose url host is one of them or a subdomain go to the ledger "
                "(blocked_domain)"
            ),
            hashed_file=True,
        )
        blocked_urls_file: str | None = option(
            None,
            "text file of urls, one a line, compared after url normalisation (blocked_url)",
            hashed_file=True,
        )
        partitions: int | None = partitions_option()

    assumed_rate = RateAssumption(50_000, "rows/s", "bench/results/spine.json's ingest rate, else this guess")
    adapter = "curation.spark.stages:run_ingest"
    estimated_by = "ingest"

    def input_fingerprint(self, options: dict, input_location) -> str:
        from curation.inputs import plan_inputs
        from curation.ops.ingest import IngestOptions

        plan = plan_inputs(input_location, IngestOptions.from_options(options), options["skip_bad_files"])
        return fingerprint_files([Path(f.path) for f in plan.files if "://" not in f.path])


STAGE = IngestStage()
