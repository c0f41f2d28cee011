"""TensorFlow's runtime for a Keras run: imported quietly, Keras on its TensorFlow backend, the
device and thread pools set before the runtime starts, and what it ended up with reported."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from loadbench.errors import LoadbenchError


def import_keras():
    """(tensorflow, keras), Keras 3 on the TensorFlow backend, with Keras and absl quiet.

    TensorFlow comes through the tf-data peer's `_import_tensorflow` (the `tfrecord` package's
    protos and triton's load order: see there); importing it directly breaks either."""
    from loadbench.peers.tf_data import _import_tensorflow

    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "tensorflow"  # a KERAS_BACKEND=jax shell must not win
    tf = _import_tensorflow()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise LoadbenchError(
            f"Keras was imported with the {keras.backend.backend()} backend before loadbench "
            "could choose TensorFlow; start a fresh process with KERAS_BACKEND=tensorflow"
        )
    keras.utils.disable_interactive_logging()  # no progress bars or summaries from Keras
    tf.get_logger().setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    return tf, keras


def configure(tf, device: str, *, intra_threads: int, inter_threads: int) -> str:
    """Devices and thread pools, then start the runtime so that nothing later (the tf-data
    peer's own settings) changes them; returns the device the model runs on: "cpu", or
    "cuda:N" (TensorFlow's GPU N, named as torch names it).

    On a GPU, memory grows as needed (`set_memory_growth`): TensorFlow would otherwise take
    nearly all of it at start, and the torch side of the process (a loader's pinned memory, a
    tensor store) would find none. Settings already fixed by an earlier start stay as they are
    (TensorFlow refuses to change them): the device returned is what the runtime has."""
    gpus = tf.config.list_physical_devices("GPU")
    wanted = _gpu_index(device, len(gpus))
    with contextlib.suppress(RuntimeError, ValueError):
        if wanted is None:
            tf.config.set_visible_devices([], "GPU")
        else:
            tf.config.set_visible_devices([gpus[wanted]], "GPU")
            tf.config.experimental.set_memory_growth(gpus[wanted], True)
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(intra_threads)
        tf.config.threading.set_inter_op_parallelism_threads(inter_threads)
    logical = tf.config.list_logical_devices("GPU")  # starts the runtime: the settings hold
    if not logical:
        return "cpu"
    return f"cuda:{wanted if wanted is not None else 0}"


def _gpu_index(device: str, gpus: int) -> int | None:
    """The GPU `device` (auto|cpu|cuda|cuda:N) asks TensorFlow for; None: the CPU."""
    if device == "cpu" or (device == "auto" and not gpus):
        return None
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    if index >= gpus:
        have = f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU (tensorflow-cpu?)"
        raise LoadbenchError(
            f"--device {device}: TensorFlow sees {have}; use --device cpu or auto, or install "
            "a TensorFlow built with CUDA (pip install 'tensorflow[and-cuda]')"
        )
    return index
