"""The row key and the deterministic uniform draw (DESIGN.md section 3).

uid = first 16 bytes of sha256(url_bytes + b"\\x00" + caption_bytes) as 32 lowercase hex characters, over the
raw bytes (UTF-8 for valid text; the original bytes where the text is not valid UTF-8; empty bytes for null).

u(seed, uid, purpose) in [0, 1) is a pure function of its arguments: the uid's two 64-bit halves are mixed with a
key derived from (seed, purpose) by two splitmix64 rounds; the top 53 bits give a double. No global RNG is ever
used, so a draw does not depend on partitioning, ordering or the number of executors.
"""

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

_UID_HEX_CHARS = 32
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def uid_of(url: bytes | None, caption: bytes | None) -> str:
    """The uid of one (url, caption) pair given as raw bytes; None counts as empty bytes."""
    return hashlib.sha256((url or b"") + b"\x00" + (caption or b"")).hexdigest()[:_UID_HEX_CHARS]


def compute_uids(urls: pa.Array, captions: pa.Array) -> pa.Array:
    """uids for two equally long binary or string arrays (hashing the raw bytes)."""
    url_bytes = _as_bytes_list(urls)
    caption_bytes = _as_bytes_list(captions)
    return pa.array([uid_of(u, c) for u, c in zip(url_bytes, caption_bytes, strict=True)], type=pa.string())


def _as_bytes_list(array: pa.Array) -> list[bytes | None]:
    if pa.types.is_string(array.type):
        array = array.cast(pa.binary())
    elif pa.types.is_large_string(array.type):
        array = array.cast(pa.large_binary())
    return array.to_pylist()


def _splitmix64(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def purpose_key(seed: int, purpose: str) -> np.uint64:
    digest = hashlib.sha256(f"{int(seed)}\x00{purpose}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "big"))


def uid_halves(uids: pa.Array | Iterable[str]) -> np.ndarray:
    """The uids as an (n, 2) uint64 array of their big-endian halves; raises ValueError on a malformed uid."""
    hex_uids = uids.to_pylist() if isinstance(uids, pa.Array | pa.ChunkedArray) else list(uids)
    if any(u is None or len(u) != _UID_HEX_CHARS for u in hex_uids):
        raise ValueError("every uid must be a 32-character hex string")
    raw = bytes.fromhex("".join(hex_uids))
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hex_uids), 2)


def uniform(seed: int, uids: pa.Array | Iterable[str], purpose: str) -> np.ndarray:
    """u(seed, uid, purpose) in [0, 1) for every uid, as float64."""
    halves = uid_halves(uids)
    key = purpose_key(seed, purpose)
    mixed = _splitmix64(_splitmix64(halves[:, 0] ^ key) ^ halves[:, 1])
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
