"""What the tests that run the whole demo pipeline share: the stage list, its inputs (metadata, corpus and the demo's
request files, `curation.demo.write_demo_requests`) and the run configuration naming the run's image server."""

from pathlib import Path

# Every demo stage, scaled to a corpus of 1,500-2,000 rows; "{requests}" names the folder of the demo's requests.
DEMO_STAGES = [
    ("ingest", {"keep_columns": ["WIDTH", "HEIGHT"], "blocked_urls_file": "{requests}/blocked_urls.txt"}),
    ("dedup_exact", {}),
    ("dedup_text", {}),
    ("match", {}),
    ("count", {}),
    ("balance", {"t": 20}),
    ("download", {"image_size": 64, "resize_mode": "keep_ratio", "shard_rows": 150, "thread_count": 8}),
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
    ("publish", {"shard_rows": 250}),
]


def demo_stage_options(stage: str, options: dict, image_port: int, requests_dir: Path) -> dict:
    """`options` with "{requests}" in string values replaced by `requests_dir`, and download allowed to reach the
    demo image server on 127.0.0.1:`image_port`."""
    resolved = {key: value.replace("{requests}", str(requests_dir)) if isinstance(value, str) else value
                for key, value in options.items()}
    if stage == "download":
        resolved["allow_hosts"] = [f"127.0.0.1:{image_port}"]
    return resolved


def write_demo_inputs(root: Path, rows: int, image_port: int) -> None:
    """Metadata (wordfreq only), a `rows`-row demo corpus whose urls point at 127.0.0.1:`image_port`, and the
    demo's requests, under `root`."""
    from curation.demo import generate_demo_corpus, write_demo_requests
    from curation.ops.metadata import build_metadata, write_metadata

    entries, _ = build_metadata(wordfreq_top_n=20_000, wordnet_dir=None)
    write_metadata(root / "metadata.json", entries)
    generate_demo_corpus(root / "corpus", entries, rows=rows, shards=2, seed=3, image_port=image_port)
    write_demo_requests(root / "requests", rows=rows, seed=0, image_port=image_port)


def demo_run_config(root: Path, name: str, image_port: int, spark: dict) -> dict:
    """The run configuration (as `curation run` reads it from YAML) of every demo stage over `write_demo_inputs`."""
    return {"name": name, "input": str(root / "corpus"), "metadata": str(root / "metadata.json"), "seed": 0,
            "spark": spark, "stages": [{stage: demo_stage_options(stage, options, image_port, root / "requests")}
                                       for stage, options in DEMO_STAGES]}
