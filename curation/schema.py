"""Column names, ledger schema and drop reasons shared by every stage (DESIGN.md section 3)."""

import pyarrow as pa

UID = "uid"
URL = "url"
CAPTION = "caption"
ENTRY_IDS = "entry_ids"
KEEP_PROBABILITY = "keep_probability"
# Largest Hamming distance between two 64-bit perceptual hashes (image_phash) that the pigeonhole candidate keys
# support: 32 chunk indexes keep the keys non-negative int64 (curation.ops.imagehash).
MAX_PHASH_DISTANCE = 31

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("related_uid", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

# Columns a stage's Spark adapter appends to its rows so that kept rows and ledger rows travel in one pass;
# a row with a null reason is kept.
TAG_REASON = "_ledger_reason"
TAG_RELATED_UID = "_ledger_related_uid"
TAG_DETAIL = "_ledger_detail"
TAG_STAGE = "_ledger_stage"
TAG_FIELDS = [
    pa.field(TAG_STAGE, pa.string()),
    pa.field(TAG_REASON, pa.string()),
    pa.field(TAG_RELATED_UID, pa.string()),
    pa.field(TAG_DETAIL, pa.string()),
]


class Reason:
    """Ledger reasons of the stages that came with the project. One input row ends in exactly one of: published, or
    one ledger row with a reason (one of these, or one a newer stage's op declares, such as `sampled_out`)."""

    MISSING_URL = "missing_url"
    EMPTY_URL = "empty_url"
    MISSING_CAPTION = "missing_caption"
    EMPTY_CAPTION = "empty_caption"
    INVALID_UTF8 = "invalid_utf8"
    NOT_HTTP_URL = "not_http_url"
    CAPTION_TOO_LONG = "caption_too_long"
    # a NUL character in the url or caption: NUL separates the two in the uid, so it would make uids ambiguous
    NUL_CHARACTER = "nul_character"
    DUPLICATE_PAIR = "duplicate_pair"
    DUPLICATE_URL = "duplicate_url"
    DUPLICATE_CAPTION = "duplicate_caption"
    NEAR_DUPLICATE_CAPTION = "near_duplicate_caption"
    UNDECODABLE_IMAGE = "undecodable_image"
    DUPLICATE_IMAGE_BYTES = "duplicate_image_bytes"
    NEAR_DUPLICATE_IMAGE = "near_duplicate_image"
    NO_METADATA_MATCH = "no_metadata_match"
    BALANCE_NOT_DRAWN = "balance_not_drawn"
    # download: img2dataset could not fetch the image (HTTP error, timeout, ...), its status and message in detail
    DOWNLOAD_FAILED = "download_failed"
    # download: the URL resolved (or redirected) to a loopback, private, link-local or multicast address, or a
    # scheme other than http(s)
    DOWNLOAD_REFUSED = "download_refused"
    # download: the server's X-Robots-Tag forbids the use (noai, noimageai, noindex, noimageindex)
    DOWNLOAD_OPT_OUT = "download_opt_out"
    # download: fetched, but img2dataset could not decode or resize it, or it broke a size/aspect limit
    IMAGE_REJECTED = "image_rejected"
    # embed: the downloaded sample could not be embedded (the embedder's message in detail)
    EMBED_FAILED = "embed_failed"
    # semdedup: cosine similarity to an earlier member of its cluster above 1 - eps (related_uid: the kept member)
    SEMANTIC_DUPLICATE = "semantic_duplicate"
    # prune: beyond its concept cluster's quota (detail: cluster, rank, quota)
    PRUNED_DENSE_CLUSTER = "pruned_dense_cluster"
    # flag_logos with policy drop: the image is within the cosine threshold of a mined spurious logo
    SPURIOUS_LOGO = "spurious_logo"
    # ingest: the url's host (or a parent domain of it) is on the domain blocklist
    BLOCKED_DOMAIN = "blocked_domain"
    # ingest: the normalised url is on the url blocklist
    BLOCKED_URL = "blocked_url"
    # block_images: the image's sha256 is on the blocklist, or its perceptual hash is within max_distance of one
    BLOCKED_IMAGE = "blocked_image"
    # filter rules (detail: the value and the rule's threshold)
    LOW_CLIP_SCORE = "low_clip_score"
    CLIP_SCORE_NOT_TOP = "clip_score_not_top"
    IMAGE_TOO_SMALL = "image_too_small"
    EXTREME_ASPECT_RATIO = "extreme_aspect_ratio"
    TOO_FEW_CAPTION_WORDS = "too_few_caption_words"
    TOO_MANY_CAPTION_WORDS = "too_many_caption_words"
    BOILERPLATE_CAPTION = "boilerplate_caption"
    # nsfw: nsfw_score above the stage's max_score
    NSFW = "nsfw"
    # decontaminate: the image is a near duplicate of an evaluation image (detail: which, by hash or cosine)
    EVAL_CONTAMINATION = "eval_contamination"
    # takedown: removed from a published release on request (detail: the request's reason)
    TAKEDOWN = "takedown"


# A duplicate_pair ledger row carries the uid of the published first occurrence by definition (same url and
# caption), so the "no uid both published and in the ledger" invariant exempts it.
REASONS_SHARING_KEPT_UID = frozenset({Reason.DUPLICATE_PAIR})
