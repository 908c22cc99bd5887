"""The demo corpus: LAION-like parquet shards with a Zipf-skewed concept distribution and planted defects.

Captions mention concepts drawn from the metadata list with probability proportional to 1 / rank**1.1, so the
head concepts match thousands of captions and the tail a handful, and MetaCLIP balancing with t of a few
hundred visibly flattens the head. Every defect a real crawl has and a stage must ledger is planted in known
numbers: exact duplicate pairs, null/empty/blank captions and URLs, non-http URLs, over-long captions, captions
that are not valid UTF-8 (in the one shard whose TEXT column is binary, as some real shards are) and captions
that match no metadata entry.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.demo_images import DEMO_IMAGE_PORT, demo_image_url

logger = logging.getLogger(__name__)

CONCEPT_COUNT = 2_000
# Concepts come from the CONCEPT_BAND * CONCEPT_COUNT most frequent plain entries after the first
# FUNCTION_WORDS_SKIPPED ("is", "you", ...), which would make odd captions.
FUNCTION_WORDS_SKIPPED = 300
CONCEPT_BAND = 4
ZIPF_EXPONENT = 1.1
DUPLICATE_SHARE = 0.02
# Templated near-duplicate captions ("<listing text> | shopNN.example") in families of 2 to 24 members, and rows
# whose URL repeats another row's with a differently cased host and a fragment (same image, other caption).
NEAR_DUPLICATE_SHARE = 0.02
URL_DUPLICATE_SHARE = 0.005
LISTING_TEMPLATE = (
    "Buy {concept} online at the best price with free shipping and easy returns | shop{shop:02d}.example"
)
# A few dozen of each defect in the default 60,000 rows; at least one in any corpus.
DEFECT_SHARE = 0.0005
LONG_TEXT_MIN_CHARS = 5_001

CAPTION_TEMPLATES = (
    "a photo of a {adjective} {concept}",
    "{concept} on a {other} background",
    "close-up of {concept} and {other}",
    "buy {concept} online",
    "{adjective} {concept} with {other}, stock photo",
    "illustration of {concept} in the style of {other}",
    "the best {concept} for {other} lovers",
    "{concept} | {adjective} design",
)
ADJECTIVES = ("red", "small", "vintage", "modern", "wooden", "blue", "old", "large", "cute", "green", "white", "dark")
# Concepts must not share words with the templates, or their counts would mix with the templates' own words.
TEMPLATE_WORDS = frozenset(
    re.sub(r"\{\w+\}|[,|]", " ", " ".join(CAPTION_TEMPLATES)).split() + list(ADJECTIVES) + ["close-up"]
)
_PLAIN_CONCEPT = re.compile(r"[a-z]{3,15}(?: [a-z]{3,15})?")

NON_HTTP_URLS = (
    "ftp://files.example.com/pub/{row}.jpg",
    "data:image/png;base64,iVBORw0KGgo{row}=",
    "javascript:alert({row})",
)
WHITESPACE_TEXTS = (" ", "   ", "\t", "\n", " \t\r\n ")
# Latin-1 bytes of accented words: what a mis-encoded crawl shard holds where UTF-8 was promised.
INVALID_UTF8_WORDS = (b"caf\xe9 latte", b"cr\xe8me br\xfbl\xe9e", b"na\xefve art", b"se\xf1or", b"\xe0 la carte")
CONSONANTS = "bcdfghjklmnpqrstvwxz"

DEFECT_KINDS = (
    "null_text",
    "empty_text",
    "whitespace_text",
    "null_url",
    "empty_url",
    "non_http_url",
    "text_too_long",
    "invalid_utf8",
    "no_match",
)

SCHEMA_FIELDS = (
    pa.field("URL", pa.string()),
    pa.field("TEXT", pa.string()),
    pa.field("WIDTH", pa.int64()),
    pa.field("HEIGHT", pa.int64()),
    pa.field("similarity", pa.float64()),
)
IMAGE_WIDTHS = np.array([256, 320, 480, 500, 600, 640, 800, 1024, 1200, 1600], dtype=np.int64)
ASPECT_RATIOS = np.array([0.5, 0.75, 1.0, 1.0, 1.33, 1.5])


def choose_concepts(entries: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """`count` entries that are plain lowercase words or two-word phrases (so always matchable), in the order
    that becomes their Zipf rank.

    They are drawn at random from a band of common words (by wordfreq frequency of the rarer word, skipping the
    most frequent function words), so the demo's head concepts read like real ones ("garden", "guitar").
    """
    # Imported here: only the demo needs word frequencies, and wordfreq's import is not free.
    import wordfreq

    frequency = wordfreq.get_frequency_dict("en", wordlist="large")
    candidates = [
        entry for entry in entries if _PLAIN_CONCEPT.fullmatch(entry) and TEMPLATE_WORDS.isdisjoint(entry.split(" "))
    ]
    if len(candidates) < 10:
        raise ValueError(f"the metadata has {len(candidates)} plain-word entries; the demo needs at least 10")
    candidates.sort(key=lambda entry: (-min(frequency.get(word, 0.0) for word in entry.split(" ")), entry))
    band = candidates[FUNCTION_WORDS_SKIPPED : FUNCTION_WORDS_SKIPPED + CONCEPT_BAND * count] or candidates
    chosen = rng.choice(len(band), size=min(count, len(band)), replace=False)
    return [band[index] for index in chosen]


def _no_match_caption(rng: np.random.Generator, entry_set: set[str]) -> str:
    """Consonant-only words forming no entry in any contiguous run, so matching finds nothing."""
    while True:
        words = ["".join(rng.choice(list(CONSONANTS), size=rng.integers(7, 11))) for _ in range(3)]
        runs = (" ".join(words[start:stop]) for start in range(3) for stop in range(start + 1, 4))
        if entry_set.isdisjoint(runs):
            return " ".join(words)


def _long_caption(rng: np.random.Generator, captions: list[str]) -> str:
    """Template captions joined into one text of LONG_TEXT_MIN_CHARS to ~3,000 more characters."""
    target_length = LONG_TEXT_MIN_CHARS + int(rng.integers(0, 3_000))
    text = captions[rng.integers(len(captions))]
    while len(text) < target_length:
        text += ". " + captions[rng.integers(len(captions))]
    return text


def _concept_captions(rng: np.random.Generator, concepts: list[str], rows: int) -> list[str]:
    ranks = np.arange(1, len(concepts) + 1, dtype=np.float64)
    probabilities = ranks**-ZIPF_EXPONENT
    probabilities /= probabilities.sum()
    main_concepts = rng.choice(len(concepts), size=rows, p=probabilities)
    other_concepts = rng.choice(len(concepts), size=rows, p=probabilities)
    templates = rng.integers(len(CAPTION_TEMPLATES), size=rows)
    adjectives = rng.integers(len(ADJECTIVES), size=rows)
    captions = []
    for main, other, template_index, adjective in zip(
        main_concepts.tolist(), other_concepts.tolist(), templates.tolist(), adjectives.tolist(), strict=True
    ):
        template = CAPTION_TEMPLATES[template_index]
        captions.append(
            template.format(concept=concepts[main], other=concepts[other], adjective=ADJECTIVES[adjective])
        )
    return captions


def generate_demo_corpus(
    output_dir: str | os.PathLike, entries: list[str], rows: int = 60_000, shards: int = 4, seed: int = 0,
    image_port: int = DEMO_IMAGE_PORT,
) -> dict:
    """Write `rows` rows as `output_dir/part-NNNNN.parquet` (URL, TEXT, WIDTH, HEIGHT, similarity) and return a
    summary: rows, shards, the binary-TEXT shard, planted counts by kind and the concept distribution.

    Deterministic for a seed: one numpy Generator drives every choice, so the files are byte-identical across
    runs (with the same pyarrow). Shard `min(1, shards - 1)` stores TEXT as binary and holds the invalid UTF-8.
    The image URLs point at the demo image server (`curation demo-images`) on 127.0.0.1:`image_port`.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if rows < 20 * shards or rows < 200:
        raise ValueError(f"rows must be >= max(200, 20 * shards) to plant every defect, got {rows}")
    rng = np.random.default_rng(seed)
    concepts = choose_concepts(entries, CONCEPT_COUNT, rng)
    captions = _concept_captions(rng, concepts, rows)
    urls: list[str | None] = [demo_image_url(row, image_port) for row in range(rows)]
    texts: list[str | bytes | None] = list(captions)

    shard_bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    binary_shard = min(1, shards - 1)
    defects_per_kind = max(1, round(rows * DEFECT_SHARE))
    duplicate_count = round(rows * DUPLICATE_SHARE)

    # Invalid UTF-8 can only live in the binary shard; every other planted row may go anywhere.
    binary_rows = rng.permutation(np.arange(shard_bounds[binary_shard], shard_bounds[binary_shard + 1]))
    invalid_utf8_rows = binary_rows[:defects_per_kind]
    remaining = np.setdiff1d(np.arange(rows), invalid_utf8_rows)
    remaining = rng.permutation(remaining)
    planted: dict[str, np.ndarray] = {"invalid_utf8": invalid_utf8_rows}
    cursor = 0
    for kind in DEFECT_KINDS:
        if kind != "invalid_utf8":
            planted[kind] = remaining[cursor : cursor + defects_per_kind]
            cursor += defects_per_kind
    duplicate_rows = remaining[cursor : cursor + duplicate_count]
    cursor += duplicate_count
    near_duplicate_rows = remaining[cursor : cursor + round(rows * NEAR_DUPLICATE_SHARE)]
    cursor += near_duplicate_rows.size
    url_duplicate_rows = remaining[cursor : cursor + round(rows * URL_DUPLICATE_SHARE)]
    cursor += url_duplicate_rows.size
    source_pool = remaining[cursor:]

    families = _near_duplicate_families(rng, near_duplicate_rows)
    for family in families:
        concept = concepts[int(rng.integers(len(concepts)))]
        for shop, row in enumerate(family.tolist()):
            texts[row] = captions[row] = LISTING_TEMPLATE.format(concept=concept, shop=shop)

    for row in planted["null_text"].tolist():
        texts[row] = None
    for row in planted["empty_text"].tolist():
        texts[row] = ""
    for index, row in enumerate(planted["whitespace_text"].tolist()):
        texts[row] = WHITESPACE_TEXTS[index % len(WHITESPACE_TEXTS)]
    for row in planted["null_url"].tolist():
        urls[row] = None
    for row in planted["empty_url"].tolist():
        urls[row] = ""
    for index, row in enumerate(planted["non_http_url"].tolist()):
        urls[row] = NON_HTTP_URLS[index % len(NON_HTTP_URLS)].format(row=row)
    for row in planted["text_too_long"].tolist():
        texts[row] = _long_caption(rng, captions)
    for index, row in enumerate(planted["invalid_utf8"].tolist()):
        texts[row] = INVALID_UTF8_WORDS[index % len(INVALID_UTF8_WORDS)] + b" " + captions[row].encode("utf-8")
    entry_set = set(entries)
    for row in planted["no_match"].tolist():
        texts[row] = _no_match_caption(rng, entry_set)

    widths = rng.choice(IMAGE_WIDTHS, size=rows)
    heights = np.maximum(1, np.rint(widths * rng.choice(ASPECT_RATIOS, size=rows))).astype(np.int64)
    similarity = np.round(np.clip(rng.normal(0.31, 0.035, size=rows), 0.05, 0.6), 6)

    # Exact duplicates copy a whole clean row (URL, TEXT and the rest), often from another shard.
    sources = rng.choice(source_pool, size=duplicate_rows.size)
    for target, source in zip(duplicate_rows.tolist(), sources.tolist(), strict=True):
        urls[target], texts[target] = urls[source], texts[source]
        widths[target], heights[target], similarity[target] = widths[source], heights[source], similarity[source]

    url_sources = rng.choice(source_pool, size=url_duplicate_rows.size, replace=False)
    for target, source in zip(url_duplicate_rows.tolist(), url_sources.tolist(), strict=True):
        scheme, _, rest = urls[source].partition("://")
        host, _, path = rest.partition("/")
        urls[target] = f"{scheme}://{host.upper()}/{path}#from-{target}"

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        start, stop = int(shard_bounds[shard]), int(shard_bounds[shard + 1])
        shard_texts = texts[start:stop]
        if shard == binary_shard:
            text_field = pa.field("TEXT", pa.binary())
            shard_texts = [text.encode("utf-8") if isinstance(text, str) else text for text in shard_texts]
        else:
            text_field = SCHEMA_FIELDS[1]
        schema = pa.schema([SCHEMA_FIELDS[0], text_field, *SCHEMA_FIELDS[2:]])
        table = pa.table(
            [urls[start:stop], shard_texts, widths[start:stop], heights[start:stop], similarity[start:stop]],
            schema=schema,
        )
        pq.write_table(table, output_dir / f"part-{shard:05d}.parquet")

    # Concept matches as the matcher would count them: one per caption that mentions the concept.
    concept_texts = Counter()
    concept_set = set(concepts)
    for text in texts:
        if isinstance(text, str) and len(text) < LONG_TEXT_MIN_CHARS:
            concept_texts.update({concept for concept in _caption_concepts(text) if concept in concept_set})
    counts_including_unmatched = list(concept_texts.values()) + [0] * (len(concepts) - len(concept_texts))
    summary = {
        "rows": rows,
        "shards": shards,
        "seed": seed,
        "binary_text_shard": f"part-{binary_shard:05d}.parquet",
        "planted": {"duplicate_pair": int(duplicate_rows.size)}
        | {kind: int(planted[kind].size) for kind in DEFECT_KINDS}
        | {
            "near_duplicate_rows": int(near_duplicate_rows.size),
            "near_duplicate_families": len(families),
            "url_duplicate": int(url_duplicate_rows.size),
        },
        "near_duplicate_family_sizes": sorted(int(family.size) for family in families),
        "concepts": len(concepts),
        "top_concepts": [[concept, count] for concept, count in concept_texts.most_common(10)],
        "median_concept_captions": float(np.median(counts_including_unmatched)),
    }
    logger.info("demo corpus: %d rows in %d shards at %s; planted %s", rows, shards, output_dir, summary["planted"])
    return summary


def _near_duplicate_families(rng: np.random.Generator, rows: np.ndarray) -> list[np.ndarray]:
    """Split the planted rows into families of 2 to 24 members (a single leftover joins the last family)."""
    families, start = [], 0
    while rows.size - start >= 2:
        size = int(min(rng.integers(2, 25), rows.size - start))
        if rows.size - start - size == 1:
            size += 1
        families.append(rows[start : start + size])
        start += size
    return families


def _caption_concepts(caption: str) -> set[str]:
    """The one- and two-word runs of a template caption (concepts are one or two plain words)."""
    words = caption.replace(",", " ").split()
    return set(words) | {" ".join(pair) for pair in zip(words, words[1:], strict=False)}


# Rows whose images the demo's data-owner requests and evaluation set name: residues of primes other than the planted
# modulus (251), so they never coincide with a planted defect's pattern; rows that are planted themselves are skipped.
BLOCKED_URL_RULE = (997, 5)
BLOCKED_IMAGE_RULE = (1009, 7)
EVAL_IMAGE_RULE = (499, 11)
EVAL_IMAGE_SCALE = 0.6
EVAL_IMAGE_QUALITY = 75


def _rows_of(rule: tuple[int, int], rows: int) -> list[int]:
    from curation.demo_images import planted_kind

    modulus, residue = rule
    return [row for row in range(residue, rows, modulus) if planted_kind(row) is None]


def write_demo_requests(output_dir: str | os.PathLike, rows: int, seed: int = 0,
                        image_port: int = DEMO_IMAGE_PORT) -> dict:
    """What the demo run's blocklist, block_images and decontaminate stages read, for a corpus of `rows` rows whose
    images the demo image server serves with `seed` (`curation demo-images --seed`):

    - `blocked_urls.txt`: urls of some rows, written with an upper-case scheme and host (url normalisation must
      still match them);
    - `blocked_image_phashes.txt`: perceptual hashes (16 hex digits) of some rows' images as the server sends them
      (the stored images are resized and re-encoded by download, so only a perceptual hash can match them);
    - `eval_images/`: an evaluation set holding resized (60%) and re-encoded (quality 75) copies of some rows'
      images, which decontaminate must find in the corpus.
    """
    import io

    from PIL import Image

    from curation.demo_images import scene_image, scene_size
    from curation.ops.imagehash import perceptual_hash

    output_dir = Path(output_dir)
    eval_dir = output_dir / "eval_images"
    eval_dir.mkdir(parents=True, exist_ok=True)
    blocked_urls = _rows_of(BLOCKED_URL_RULE, rows)
    lines = []
    for row in blocked_urls:
        scheme, _, rest = demo_image_url(row, image_port).partition("://")
        host, _, path = rest.partition("/")
        lines.append(f"{scheme.upper()}://{host.upper()}/{path}")
    (output_dir / "blocked_urls.txt").write_text("# demo: urls a data owner asked to remove\n"
                                                 + "\n".join(lines) + "\n")

    blocked_images = _rows_of(BLOCKED_IMAGE_RULE, rows)
    hashes = [f"{perceptual_hash(scene_image(seed, row, *scene_size(seed, row))):016x}" for row in blocked_images]
    (output_dir / "blocked_image_phashes.txt").write_text("# demo: perceptual hashes of images to remove\n"
                                                          + "\n".join(hashes) + "\n")
    eval_rows = _rows_of(EVAL_IMAGE_RULE, rows)
    for row in eval_rows:
        width, height = scene_size(seed, row)
        copy = scene_image(seed, row, width, height).resize(
            (round(width * EVAL_IMAGE_SCALE), round(height * EVAL_IMAGE_SCALE)), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        copy.save(buffer, format="JPEG", quality=EVAL_IMAGE_QUALITY)
        (eval_dir / f"eval-{row:08d}.jpg").write_bytes(buffer.getvalue())
    summary = {"blocked_urls": len(blocked_urls), "blocked_images": len(blocked_images), "eval_images": len(eval_rows)}
    logger.info("demo requests in %s: %s", output_dir, summary)
    return summary
