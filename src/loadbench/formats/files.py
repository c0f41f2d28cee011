"""`files-jpeg`, `files-png`, `files-jp2`, `files-webp` — one image file per sample in class
folders (the "file system" way).

Layout: `<split>/<NNN>_<class>/<index>.<ext>` plus `<split>/labels.npy`. Class folders carry their
index as a prefix, so torchvision's ImageFolder on a split folder finds the same class indices.
Pipeline when reading: file -> decode -> uint8 -> float32 (document 000's "JPEG => PIL => uint8 =>
float32"), decoding JPEG with torchvision.io and PNG with Pillow, the fastest decoder of each that
a damaged file cannot crash (see `codecs.decode`); JPEG 2000 and WebP with Pillow (OpenJPEG,
libwebp). torchvision's ImageFolder reads the JPEG, PNG and WebP trees; it lists no `.jp2`.
"""

from __future__ import annotations

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from loadbench.formats import codecs, pillow_codecs
from loadbench.formats.base import (
    Format,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
)


def class_dirs(classes: list[str]) -> list[str]:
    """Folder names that sort in class order and are safe on every filesystem."""
    width = max(3, len(str(len(classes) - 1)))
    return [
        f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', c)[:64]}" for i, c in enumerate(classes)
    ]


class FilesWriter(SplitWriter):
    def __init__(self, layout: SplitLayout, codec: str):
        self.layout = layout
        self.codec = codec
        self.ext = codecs.EXTENSIONS[codec]
        self.lossy = codecs.is_lossy(codec, layout.options)
        self.dir = os.path.join(layout.root, layout.split)
        self.class_dirs = class_dirs(layout.classes)
        self.width = max(7, len(str(max(layout.count - 1, 0))))
        self.labels = np.empty(layout.end - layout.start, dtype=np.int64)
        self.pos = layout.start
        threads = layout.threads or max(1, min(8, os.cpu_count() or 1))
        # One thread encodes in this thread: a pool of one only adds a hand-off per image.
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    @classmethod
    def range_unit(cls, layout: SplitLayout) -> int:
        return 1  # every image is a file of its own

    @classmethod
    def prepare(cls, layout: SplitLayout) -> None:
        for name in class_dirs(layout.classes):
            os.makedirs(os.path.join(layout.root, layout.split, name), exist_ok=True)

    @classmethod
    def join(cls, layout: SplitLayout, parts: list[dict]) -> dict:
        labels = np.concatenate([part["labels"] for part in parts])
        np.save(os.path.join(layout.root, layout.split, "labels.npy"), labels)
        return {key: value for key, value in parts[0].items() if key != "labels"}

    def path(self, index: int, label: int) -> str:
        return os.path.join(self.dir, self.class_dirs[label], f"{index:0{self.width}d}.{self.ext}")

    def _store(self, item: tuple[int, np.ndarray, int]) -> np.ndarray:
        index, image, label = item
        data = codecs.encode(image, self.codec, self.layout.options)
        with open(self.path(index, label), "wb") as f:
            f.write(data)
        # A lossy codec's checksum must cover what a reader decodes, not what went in.
        return codecs.decode(data, image.shape[2]) if self.lossy else image

    def write(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        items = [(self.pos + k, images[k], int(labels[k])) for k in range(len(images))]
        stores = self.pool.map(self._store, items) if self.pool else map(self._store, items)
        stored = np.stack(list(stores)) if items else images
        at = self.pos - self.layout.start
        self.labels[at : at + len(images)] = labels
        self.pos += len(images)
        return stored

    def close(self) -> dict:
        if self.pool:
            self.pool.shutdown()
        extras = {"class_dirs": self.class_dirs, "name_width": self.width, "extension": self.ext}
        return {**extras, "labels": self.labels}  # `join` writes labels.npy of the whole split

    def abort(self):
        if self.pool:  # no thread goes on writing files into a store being removed
            self.pool.shutdown(cancel_futures=True)


class FilesReader(SplitReader):
    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        info = manifest.splits[split].model_extra
        self.dir = os.path.join(root, split)
        self.class_dirs = info.get("class_dirs")
        self.width = info.get("name_width")
        self.ext = info.get("extension")
        if not _is_layout(self.class_dirs, self.width, self.ext, len(manifest.classes)):
            layout = f"{self.class_dirs!r}, name_width {self.width!r}, extension {self.ext!r}"
            raise self._damaged(f"the manifest's file layout of {split}", f"class_dirs {layout}")
        own_reads = type(self).read_items is FilesReader.read_items  # not a peer's reader
        if own_reads and self.ext == codecs.EXTENSIONS["jpeg"]:  # here: forked workers have it
            codecs.load_jpeg_decoder()

    def _open(self):
        rel = f"{self.split}/labels.npy"
        labels = self._read_npy(rel)
        if labels.shape != (self.count,) or labels.dtype.kind not in "iu":
            raise self._damaged(rel, f"{labels.shape} {labels.dtype}, not {self.count} labels")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(self.class_dirs):
            raise self._damaged(rel, f"labels outside 0..{len(self.class_dirs) - 1}")
        return labels

    def path(self, index: int, label: int) -> str:
        return os.path.join(self.dir, self.class_dirs[label], f"{index:0{self.width}d}.{self.ext}")

    def labels(self) -> np.ndarray:
        return self.handle.astype(np.int64)

    def relpath(self, index: int, label: int) -> str:
        return f"{self.split}/{self.class_dirs[label]}/{index:0{self.width}d}.{self.ext}"

    def read_items(self, indices: np.ndarray):
        out = self._empty(len(indices))
        return out, self.read_batch_into(indices, out)

    def read_batch_into(self, indices, out):
        """Each image's file read and decoded straight into `out`, in the order asked (files
        are read one by one: sorting them first gains nothing)."""
        if type(self).read_items is not FilesReader.read_items:  # a reader of its own (a peer)
            return super().read_batch_into(indices, out)
        labels = self.handle[indices].astype(np.int64)
        rels = None
        if self.files.remote:  # object storage or its cache: the batch's files fetched at once
            rels = [self.relpath(int(i), int(y)) for i, y in zip(indices, labels, strict=True)]
        if rels is not None and not self.files.has_local_files:
            for k, (rel, data) in enumerate(zip(rels, self.files.read_many(rels), strict=True)):
                self._decode_into(data, out[k], rel)
            return labels
        paths = self.files.local_paths(rels) if rels is not None else self._paths(indices, labels)
        for k, path in enumerate(paths):
            try:
                data = read_file(path)
            except OSError as e:
                raise self._damaged(f"cannot read {self._rel_of(indices, labels, k)}", e) from None
            self._decode_into(data, out[k], None, indices, labels, k)
        return labels

    def _paths(self, indices: np.ndarray, labels: np.ndarray) -> list[str]:
        """The local files of a batch, by formatting (~1 us an image, a fifth of `relpath` +
        `local_paths`)."""
        folders, width, ext = self._folders, self.width, self.ext
        return [f"{folders[y]}{i:0{width}d}.{ext}"
                for i, y in zip(indices.tolist(), labels.tolist(), strict=True)]  # fmt: skip

    @functools.cached_property
    def _folders(self) -> list[str]:
        return [os.path.join(self.dir, name, "") for name in self.class_dirs]

    def _rel_of(self, indices, labels, k: int) -> str:
        return self.relpath(int(indices[k]), int(labels[k]))

    def _decode_into(self, data, out: np.ndarray, rel: str | None, *where) -> None:
        try:
            codecs.decode_into(data, out)
        except codecs.BadImage as e:
            raise self._damaged(f"cannot decode {rel or self._rel_of(*where)}", e) from None


def read_file(path: str) -> bytes:
    """A whole file, with `os` calls: half of `open().read()`'s 6 us for a small file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        while len(data) < size and (more := os.read(fd, size - len(data))):  # short reads
            data += more
        return data
    finally:
        os.close(fd)


def _is_layout(class_dirs, width, ext, classes: int) -> bool:
    """Whether a manifest's file layout is one `FilesWriter` writes: paths made of it stay in
    the store, whatever a damaged or hostile manifest says."""
    return (
        isinstance(class_dirs, list)
        and len(class_dirs) == classes
        and all(isinstance(d, str) and _SAFE_NAME.fullmatch(d) and d.strip(".") for d in class_dirs)
        and type(width) is int
        and 1 <= width <= 20
        and ext in codecs.EXTENSIONS.values()
    )


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


class _FilesFormat(Format):
    dtypes = ("uint8",)
    reader_class = FilesReader
    tracks_every_file = False
    writer_class = FilesWriter
    codec: str

    def writer(self, layout: SplitLayout) -> SplitWriter:
        return FilesWriter(layout, self.codec)

    def is_lossy(self, options):
        return codecs.is_lossy(self.codec, options)


@register_format
class JpegFilesFormat(_FilesFormat):
    name = "files-jpeg"
    summary = "one JPEG file per image in class folders (lossy; libjpeg-turbo decode)"
    codec = "jpeg"
    options = codecs.JPEG_OPTIONS

    def check(self, dtype, options):
        codecs.check_quality(self.name, options)


@register_format
class PngFilesFormat(_FilesFormat):
    name = "files-png"
    summary = "one PNG file per image in class folders (lossless)"
    codec = "png"
    options = codecs.PNG_OPTIONS


class _PillowFilesFormat(_FilesFormat):
    """JPEG 2000 or WebP files: lossless unless the codec's lossy option is set; there only
    where Pillow was built with the codec's library."""

    def check(self, dtype, options):
        pillow_codecs.check_options(self.name, options)

    def missing(self) -> str | None:
        note = pillow_codecs.missing(self.codec)
        return f"{self.name} cannot run here: {note}" if note else None


@register_format
class Jp2FilesFormat(_PillowFilesFormat):
    name = "files-jp2"
    summary = (
        "one JPEG 2000 file per image in class folders (lossless; jp2_rate: lossy; OpenJPEG "
        "decode; not read by ImageFolder)"
    )
    codec = "jp2"
    options = pillow_codecs.JP2_OPTIONS


@register_format
class WebpFilesFormat(_PillowFilesFormat):
    name = "files-webp"
    summary = (
        "one WebP file per image in class folders (lossless; webp_quality: lossy; libwebp decode)"
    )
    codec = "webp"
    options = pillow_codecs.WEBP_OPTIONS
