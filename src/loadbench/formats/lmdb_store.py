"""`lmdb` — one LMDB environment (a single memory-mapped file) per split, one key per image.

Key: the index as 8 big-endian bytes (keys sort in split order, so writes append and a range
of indices is a range of pages). Value: the label (int64, 8 bytes) then the raw pixels in the
storage dtype. A batch is read in one read transaction. Environments are opened lazily per
process, read-only and lock-free (LMDB handles must not cross a fork).
"""

from __future__ import annotations

import os

import numpy as np

from loadbench.formats.base import Format, SplitLayout, SplitReader, SplitWriter, register_format
from loadbench.formats.pixels import DTYPES

LABEL_BYTES = 8

# LMDB refuses to open one environment twice in a process, and a forked DataLoader worker
# inherits its parent's open environments. So environments are shared by every reader of a
# process, counted, and an inherited one is closed in the child (which only unmaps the child's
# copy) before the child opens its own.
_ENVS: dict[tuple, list] = {}  # (path, device, inode) -> [pid, env, readers]


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_dev, st.st_ino)


def acquire_env(path: str):
    import lmdb

    key = _file_key(path)
    entry = _ENVS.get(key)
    if entry is not None and entry[0] == os.getpid():
        entry[2] += 1
        return entry[1]
    if entry is not None:
        entry[1].close()  # inherited through fork: the parent's copy is untouched
    env = lmdb.open(path, subdir=False, readonly=True, lock=False, readahead=False, meminit=False)
    _ENVS[key] = [os.getpid(), env, 1]
    return env


def release_env(env) -> None:
    for key, entry in list(_ENVS.items()):
        if entry[1] is env and entry[0] == os.getpid():
            entry[2] -= 1
            if entry[2] == 0:
                del _ENVS[key]
                env.close()


def key(index: int) -> bytes:
    return int(index).to_bytes(8, "big")


class LmdbWriter(SplitWriter):
    def __init__(self, layout: SplitLayout):
        import lmdb

        self.path = os.path.join(layout.root, f"{layout.split}.lmdb")
        image_bytes = int(np.prod(layout.image_shape)) * np.dtype(DTYPES[layout.dtype]).itemsize
        # The map is only an address-space reservation; the file grows with the data.
        map_size = (layout.count * (image_bytes + LABEL_BYTES + 64)) * 2 + (64 << 20)
        self.env = lmdb.open(
            self.path, map_size=map_size, subdir=False, readahead=False, meminit=False,
            max_dbs=0, sync=False,
        )  # fmt: skip
        self.pos = 0

    def write(self, images, labels):
        with self.env.begin(write=True) as txn:
            for k in range(len(images)):
                label = np.int64(labels[k]).tobytes()
                txn.put(key(self.pos + k), label + images[k].tobytes(), append=True)
        self.pos += len(images)
        return images

    def close(self):
        self.env.sync(True)
        self.env.close()
        lock = self.path + "-lock"
        if os.path.exists(lock):
            os.remove(lock)  # readers open lock-free; a stale lock file is not part of the store
        return {}

    def abort(self):
        self.env.close()  # the write transaction that failed was aborted as it left `with`


class LmdbReader(SplitReader):
    def _open(self):
        import lmdb

        try:  # LMDB maps a real file: a remote store is read from its read-through copy
            env = acquire_env(self.files.local_path(f"{self.split}.lmdb"))
        except (lmdb.Error, OSError) as e:
            raise self._damaged(f"{self.split}.lmdb cannot be opened", e) from None
        entries = env.stat()["entries"]
        if entries != self.count:
            release_env(env)
            raise self._damaged(
                f"{self.split}.lmdb has {entries} entries", f"{self.count} expected"
            )
        return env

    def close(self):
        env, self._handle = self._handle, None
        if env is not None and self._pid == os.getpid():
            release_env(env)

    def read_items(self, indices):
        import lmdb

        out = self._empty(len(indices))
        labels = np.empty(len(indices), dtype=np.int64)
        flat = out.reshape(len(indices), -1).view(np.uint8)
        try:
            with self.handle.begin(buffers=True) as txn:
                for k, index in enumerate(indices):
                    value = txn.get(key(index))
                    if value is None:
                        raise self._damaged(
                            f"{self.split}.lmdb has no image {index}", "missing key"
                        )
                    raw = np.frombuffer(value, dtype=np.uint8)
                    labels[k] = raw[:LABEL_BYTES].view(np.int64)[0]
                    flat[k] = raw[LABEL_BYTES:]  # copied out before the transaction ends
        except lmdb.Error as e:
            raise self._damaged(f"{self.split}.lmdb cannot be read", e) from None
        except ValueError as e:
            raise self._damaged(f"{self.split}.lmdb holds a value of the wrong size", e) from None
        return out, labels


@register_format
class LmdbFormat(Format):
    name = "lmdb"
    summary = "LMDB key-value file per split, one key per image (raw pixels)"
    writer_class = LmdbWriter
    reader_class = LmdbReader

    def needs_local_file(self, options):
        return True
