"""Random access to the samples of webdataset tar shards (what img2dataset writes: `<key>.jpg`, `<key>.txt`,
`<key>.json` per sample).

A shard is indexed once (member headers only, no data read) and any sample's files are then read by offset, so a
reader can serve samples in any order and several readers (DataLoader workers, Spark tasks) can share one shard.
"""

import tarfile
from pathlib import Path

# The extensions img2dataset writes for images, in the order one is preferred when a sample carries several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# key -> extension -> (byte offset of the member's data, size)
TarIndex = dict[str, dict[str, tuple[int, int]]]


def index_tar(path: str | Path) -> TarIndex:
    """The samples of an uncompressed tar in file order, grouped by webdataset key (the member path up to the first
    dot of its file name), with each file's data offset and size."""
    members: TarIndex = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, file_name = member.name.rpartition("/")
                stem, dot, extension = file_name.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                members.setdefault(key, {})[extension.lower()] = (member.offset_data, member.size)
    except tarfile.TarError as error:
        raise ValueError(f"{path}: not a readable uncompressed tar ({error})") from error
    return members


def image_extension(files: dict[str, tuple[int, int]]) -> str | None:
    return next((extension for extension in IMAGE_EXTENSIONS if extension in files), None)


def read_member(handle, location: tuple[int, int]) -> bytes:
    offset, size = location
    handle.seek(offset)
    return handle.read(size)


def read_images(path: str | Path, keys: list[str], index: TarIndex | None = None) -> list[bytes | None]:
    """The image bytes of each sample key in the shard at `path` (None for a key without an image); `index` is the
    shard's `index_tar` when the caller has it already."""
    index = index_tar(path) if index is None else index
    images: list[bytes | None] = []
    with open(path, "rb") as handle:
        for key in keys:
            files = index.get(key, {})
            extension = image_extension(files)
            images.append(read_member(handle, files[extension]) if extension else None)
    return images
