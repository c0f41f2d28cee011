"""`hf-datasets`: a Hugging Face `datasets` Arrow dataset per split (`save_to_disk`), read with
`load_from_disk(...).with_format("torch")` + a DataLoader, as the library's PyTorch guide does:
https://huggingface.co/docs/datasets/use_with_pytorch
"""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

from loadbench.formats import codecs
from loadbench.formats.base import (
    Option,
    SplitLayout,
    SplitReader,
    SplitWriter,
    register_format,
)
from loadbench.peers._base import PeerFormat


def _import_datasets():
    import datasets

    return datasets


@contextlib.contextmanager
def _quiet_datasets(datasets):
    """No tqdm bars from `datasets` while loadbench shows its own progress."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _hf_features(datasets, layout: SplitLayout):
    image = (
        datasets.Image()
        if layout.options["encoding"] == "png"
        else datasets.Array3D(shape=tuple(layout.image_shape), dtype="uint8")
    )
    return datasets.Features({"image": image, "label": datasets.ClassLabel(names=layout.classes)})


class HfDatasetsWriter(SplitWriter):
    """Rows into an Arrow file (the writer `Dataset.from_generator` uses), then
    `save_to_disk` into `<split>/` as a user would."""

    def __init__(self, layout: SplitLayout):
        datasets = _import_datasets()
        from datasets.arrow_writer import ArrowWriter

        self.layout = layout
        self.scratch = os.path.join(layout.root, f".{layout.split}.arrow")
        self.writer = ArrowWriter(features=_hf_features(datasets, layout), path=self.scratch)

    def write(self, images, labels):
        if self.layout.options["encoding"] == "png":
            column = [
                {"bytes": codecs.encode(image, "png", self.layout.options), "path": None}
                for image in images
            ]
        else:
            column = list(images)
        self.writer.write_batch({"image": column, "label": [int(x) for x in labels]})
        return images  # PNG and raw arrays are both lossless

    def close(self):
        datasets = _import_datasets()
        self.writer.finalize()
        self.writer.close()
        dataset = datasets.Dataset.from_file(self.scratch)
        with _quiet_datasets(datasets):
            dataset.save_to_disk(os.path.join(self.layout.root, self.layout.split))
        del dataset
        os.remove(self.scratch)
        return {}


# state.json's format as `save_to_disk` writes it for `HfDatasetsWriter`'s dataset: no other
# formatter (another would import its framework) than the ones the reader asks for.
STATE_FORMAT = {
    "_format_type": None, "_format_kwargs": {}, "_format_columns": None,
    "_output_all_columns": False,
}  # fmt: skip


@functools.cache
def _read_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` raises for a damaged dataset folder: JSON that does not parse
    (ValueError) or lacks the keys and types it reads (KeyError, TypeError, AttributeError: it
    calls dict methods on what the JSON holds), Arrow's errors on a damaged Arrow file, and
    Pillow's on a damaged PNG (the Image feature decodes with Pillow)."""
    import pyarrow

    return (
        OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
        pyarrow.ArrowException, *codecs.pil_errors(),
    )  # fmt: skip


class HfDatasetsReader(SplitReader):
    """`load_from_disk` (memory-mapped Arrow); samples through `with_format("torch")`."""

    def __init__(self, root, manifest, split):
        super().__init__(root, manifest, split)
        self.classes = manifest.classes
        self.file_sizes = manifest.files

    def _open(self):
        datasets = _import_datasets()
        arrow = ", ".join(self._check_state())
        path = os.path.join(self.root, self.split)
        try:
            with _quiet_datasets(datasets):
                dataset = datasets.load_from_disk(path)
        except _read_errors() as e:
            raise self._damaged(f"{self.split}/dataset_info.json or {arrow}", e) from None
        layout = SplitLayout(self.root, self.split, self.count, self.image_shape, self.dtype,
                             self.options, self.classes)  # fmt: skip
        if dataset.features != _hf_features(datasets, layout):
            raise self._damaged(f"{self.split}/dataset_info.json", f"features {dataset.features}")
        if len(dataset) != self.count:
            raise self._damaged(f"{self.split}/", f"{len(dataset)} rows")
        return {
            "dataset": dataset,
            "torch": dataset.with_format("torch"),
            "numpy": dataset.with_format("numpy"),
            "arrow": arrow,  # the Arrow files, for errors
        }

    def _check_state(self) -> list[str]:
        """The Arrow files of the split that state.json names: files the store lists. And
        state.json names no formatter."""
        rel = f"{self.split}/state.json"
        state = self._read_json(rel)
        files = state.get("_data_files") if isinstance(state, dict) else None
        names = [f.get("filename") if isinstance(f, dict) else None for f in files or [None]]
        if not all(isinstance(n, str) and f"{self.split}/{n}" in self.file_sizes for n in names):
            raise self._damaged(rel, f"data files {files!r:.80} that the store does not list")
        if any(state.get(key, "absent") != want for key, want in STATE_FORMAT.items()):
            raise self._damaged(rel, "a format that the store was not saved with")
        return [f"{self.split}/{name}" for name in names]

    def labels(self) -> np.ndarray:
        # The Arrow column itself: no image is decoded.
        h = self.handle
        try:
            labels = h["dataset"].data.column("label").to_numpy()
        except _read_errors() as e:
            raise self._damaged(f"{h['arrow']} (labels)", e) from None
        return labels.astype(np.int64)

    def read_items(self, indices):
        h = self.handle
        try:
            rows = h["numpy"][np.asarray(indices, dtype=np.int64)]
            images, labels = np.asarray(rows["image"]), np.asarray(rows["label"], dtype=np.int64)
        except _read_errors() as e:
            raise self._damaged(f"{h['arrow']} (rows)", e) from None
        if images.ndim == 3:  # grayscale PNG decodes to (n, H, W)
            images = images[..., None]
        if images.shape != (len(indices), *self.image_shape) or images.dtype.kind not in "iu":
            raise self._damaged(f"{h['arrow']} (rows)", f"images of {images.shape} {images.dtype}")
        # The numpy (and torch) formatter widens integer arrays to int64; PNG images stay uint8.
        return images.astype(np.uint8, copy=False), labels

    def samples(self, indices):
        h = self.handle
        try:  # the Image feature decodes with Pillow: a damaged or hostile PNG raises here
            rows = h["torch"].__getitems__([int(i) for i in indices])
        except _read_errors() as e:
            raise self._damaged(f"{h['arrow']} (rows)", codecs.pil_message(e)) from None
        return [(self._image_tensor(row["image"]), int(row["label"])) for row in rows]

    def _image_tensor(self, image):
        if self.options["encoding"] == "png":  # the torch formatter gives PIL images as uint8 C,H,W
            return image.float().div_(255)
        return image.permute(2, 0, 1).float().div_(255)  # Array3D arrives as int64 H,W,C

    def loader(self, order, *, access, batch_size, workers, pin_memory, augmenter):
        from loadbench.peers._pipeline import map_style_loader

        return map_style_loader(self, order, batch_size, workers, pin_memory, augmenter)


@register_format
class HfDatasetsPeer(PeerFormat):
    name = "hf-datasets"
    summary = "peer: Hugging Face datasets (Arrow, load_from_disk, torch format) + DataLoader"
    requires = ("datasets",)
    install = "datasets"
    # PNG by default: how image datasets (CIFAR-10 among them) are stored on the Hub, so this is
    # what a datasets user trains from; `array` (lossless, no decode) is there for comparison.
    options = {
        "encoding": Option("png", "how an image is stored", choices=("png", "array")),
        **codecs.PNG_OPTIONS,
    }
    writer_class = HfDatasetsWriter
    reader_class = HfDatasetsReader
