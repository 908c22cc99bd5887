"""What the tests that run the whole demo pipeline share: options that name the run's image server and the demo's
request files (`curation.demo.write_demo_requests`)."""

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
