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


class TarReader:
    """Reads samples from many tars by (path, key), keeping the indexes and open handles of the `capacity` tars used
    most recently: rows sorted by shard touch few tars at a time, and an open-file limit is never approached."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._open: dict[str, tuple[TarIndex, object]] = {}

    def image(self, path: str | Path, key: str) -> tuple[str, bytes] | None:
        """(extension, bytes) of the image of sample `key` in the tar at `path`; None when it has none."""
        index, handle = self._tar(str(path))
        files = index.get(key, {})
        extension = image_extension(files)
        return (extension, read_member(handle, files[extension])) if extension else None

    def _tar(self, path: str) -> tuple[TarIndex, object]:
        if path in self._open:
            self._open[path] = self._open.pop(path)  # most recently used last
        else:
            if len(self._open) >= self.capacity:
                self._open.pop(next(iter(self._open)))[1].close()
            self._open[path] = (index_tar(path), open(path, "rb"))
        return self._open[path]

    def close(self) -> None:
        for _, handle in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
