"""What the tests that run the whole demo pipeline share: options that name the run's image server and the demo's
request files (`curation.demo.write_demo_requests`)."""

from pathlib import Path


def demo_stage_options(stage: str, options: dict, image_port: int, requests_dir: Path) -> dict:
    """`options` with "{requests}" in string values replaced by `requests_dir`, and download allowed to reach the
    demo image server on 127.0.0.1:`image_port`."""
    resolved = {key: value.replace("{requests}", str(requests_dir)) if isinstance(value, str) else value
                for key, value in options.items()}
    if stage == "download":
        resolved["allow_hosts"] = [f"127.0.0.1:{image_port}"]
    return resolved
