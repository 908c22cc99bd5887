import os
from pathlib import Path

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property tests are derandomized by default (profile "ci"): the examples depend only on the test's code, so a run
# fails or passes the same way on every machine and rerun, and no deadline makes a slow CI core a failure. Set
# HYPOTHESIS_PROFILE=explore to draw fresh random examples (more of them) while hunting for bugs. A test's own
# @settings still overrides single values (max_examples, ...).
settings.register_profile("ci", derandomize=True, deadline=None, database=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=1_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def shared_data_dir() -> Path | None:
    """The real public data beside the checkout (`../shared/data`), or `$CURATION_TEST_DATA`; None when absent."""
    configured = os.environ.get("CURATION_TEST_DATA")
    candidate = Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared real data; the test is skipped when it is absent (a user's machine)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared real data (../shared/data or $CURATION_TEST_DATA) is absent")
    return path
