"""Dataset sources: a registry of kinds, and `load_source(spec)` that every command uses.

A spec is `kind[:ARG][?option=value&...]`: `digits`, `synthetic:cifar-like?count=2000`,
`cifar10:~/data/cifar-10-python.tar.gz?limit=1000`,
`fashion-mnist:~/data/fmnist?remap=upper=0,2,3,4,6;trousers=1;shoes=5,7,9&drop=8`.
Options may also be passed as keywords (`load_source("digits", limit=100)`), which win over the
spec's. Each kind lives in its own module and registers itself with `@register_source`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from pydantic import ValidationError

from loadbench.errors import LoadbenchError
from loadbench.options import Option
from loadbench.sources.base import COMMON_OPTIONS, Source, SourceOptions, options_model
from loadbench.sources.raw import RawDataset

__all__ = [
    "SOURCE_KINDS", "Source", "SourceOptions", "from_arrays", "load_source", "register_source",
]  # fmt: skip


@dataclass(frozen=True)
class SourceKind:
    name: str
    open: Callable[[str | None, Any], RawDataset]
    options: type  # the pydantic model of its options (SourceOptions and `own`)
    arg: str  # what goes after the colon, for help texts; "" when the kind takes none
    summary: str
    arg_required: bool = True
    arg_is_path: bool = True
    own: dict[str, Option] | None = None  # the options only this kind takes

    @property
    def declared(self) -> dict[str, Option]:
        """Every option it takes: every source's, then its own."""
        return {**COMMON_OPTIONS, **(self.own or {})}


SOURCE_KINDS: dict[str, SourceKind] = {}

# Modules that register kinds; imported on first use so that `loadbench --help` stays fast.
_KIND_MODULES = ("cifar", "idx", "tinyimagenet", "folder", "digits", "synthetic")


def register_source(
    name: str,
    *,
    options: dict[str, Option] | None = None,
    arg: str = "PATH",
    summary: str,
    arg_required: bool = True,
    arg_is_path: bool = True,
) -> Callable:
    """Register `fn(arg, options) -> RawDataset` as the reader of source kind `name`;
    `options` are the ones only this kind takes (every kind takes `COMMON_OPTIONS`)."""
    model = options_model(name.title().replace("-", ""), options or {})

    def deco(fn: Callable[[str | None, Any], RawDataset]) -> Callable:
        SOURCE_KINDS[name] = SourceKind(name, fn, model, arg, summary, arg_required, arg_is_path,
                                        dict(options or {}))  # fmt: skip
        return fn

    return deco


def source_options() -> dict[str, dict[str, Option]]:
    """{kind: its own options} of every source kind (all also take `COMMON_OPTIONS`)."""
    return {kind.name: kind.own or {} for kind in _load_kinds().values()}


def check_source_options(spec: str, options: dict[str, Any]) -> None:
    """Raise LoadbenchError when `options` (with the spec's own) are not what the spec's kind
    takes; nothing is read."""
    kind_name, _, params = split_spec(spec)
    kind = SOURCE_KINDS[kind_name]
    try:
        kind.options.model_validate({**params, **options})
    except ValidationError as e:
        raise LoadbenchError(_explain_options(kind, e)) from None


def _load_kinds() -> dict[str, SourceKind]:
    for module in _KIND_MODULES:
        importlib.import_module(f"loadbench.sources.{module}")
    return SOURCE_KINDS


def split_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    """`kind:arg?a=1&b=2` -> ("kind", "arg", {"a": "1", "b": "2"})."""
    kinds = _load_kinds()
    head, _, query = spec.partition("?")
    kind, sep, arg = head.partition(":")
    kind = kind.strip().lower()
    if kind not in kinds:
        known = ", ".join(sorted(kinds))
        hint = ""
        if os.path.exists(os.path.expanduser(spec)):
            hint = f"; to read a folder of images write folder:{spec}"
        raise LoadbenchError(
            f"unknown source {spec!r}: a source is KIND[:ARG] with KIND one of {known}{hint}"
        )
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    return kind, (arg if sep else None), params


def load_source(spec: str, **options: Any) -> Source:
    """Open a dataset by spec string; keyword options override those in the spec.

    Example: `load_source("fashion-mnist:~/data", drop=["Bag"], limit=1000)`.
    """
    kind_name, arg, params = split_spec(spec)
    kind = SOURCE_KINDS[kind_name]
    if kind.arg_required and not arg:
        raise LoadbenchError(f"source {kind_name} needs {kind.arg}: write {kind_name}:{kind.arg}")
    if not kind.arg and arg:
        raise LoadbenchError(f"source {kind_name} takes no argument (got {kind_name}:{arg})")
    merged: dict[str, Any] = {**params, **{k: v for k, v in options.items() if v is not None}}
    try:
        opts = kind.options.model_validate(merged)
    except ValidationError as e:
        raise LoadbenchError(_explain_options(kind, e)) from None
    path_arg = arg
    if arg and kind.arg_is_path:
        path_arg = os.path.abspath(os.path.expanduser(arg))
        if not os.path.exists(path_arg):
            raise LoadbenchError(f"{kind_name}: {arg} does not exist ({kind.arg} expected)")
    raw = kind.open(path_arg, opts)
    identity = {"kind": kind_name, "arg": path_arg, **opts.model_dump(exclude_defaults=True)}
    source = Source(kind_name, canonical_spec(kind_name, arg, opts), raw, opts, identity)
    if getattr(opts, "skip_corrupt", False):
        source.drop_corrupt()
    return source


def from_arrays(
    splits: dict[str, tuple[Any, Any]],
    classes: list[str] | None = None,
    name: str = "arrays",
    **options: Any,
) -> Source:
    """A source from arrays already in memory: {split: (uint8 (N,H,W[,C]), int labels (N,))}.

    For notebooks and tests; the same options as any source apply (limit, remap, ...).
    """
    import hashlib

    import numpy as np

    from loadbench.sources.raw import ArraySplit

    raw_splits, digest, shape = {}, hashlib.sha256(), None
    for split, (images, labels) in splits.items():
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise LoadbenchError(
                f"{split}: images must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}"
            )
        if images.ndim == 3:
            images = images[..., None]
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(images):
            raise LoadbenchError(f"{split}: {len(images)} images but {len(labels)} labels")
        if shape is not None and images.shape[1:] != shape:
            raise LoadbenchError(f"{split}: images are {images.shape[1:]}, other splits {shape}")
        shape = images.shape[1:]
        raw_splits[split] = ArraySplit(np.ascontiguousarray(images), labels)
        digest.update(split.encode())
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
    if shape is None:
        raise LoadbenchError("from_arrays needs at least one split")
    n_classes = max(
        (int(s.labels.max()) + 1 for s in raw_splits.values() if len(s.labels)), default=1
    )
    classes = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    for split, raw in raw_splits.items():
        if len(raw.labels) and (raw.labels.min() < 0 or raw.labels.max() >= len(classes)):
            raise LoadbenchError(f"{split}: labels outside 0..{len(classes) - 1}")
    try:
        opts = SourceOptions.model_validate(options)
    except ValidationError as e:
        raise LoadbenchError(
            _explain_options(SourceKind(name, None, SourceOptions, "", ""), e)
        ) from None
    raw = RawDataset(classes=classes, image_shape=tuple(shape), splits=raw_splits)
    identity = {
        "kind": name,
        "sha256": digest.hexdigest(),
        **opts.model_dump(exclude_defaults=True),
    }
    return Source(name, canonical_spec(name, None, opts), raw, opts, identity)


def canonical_spec(kind: str, arg: str | None, opts: SourceOptions) -> str:
    """The spec string that reproduces this source: options that differ from defaults, sorted."""
    values = opts.model_dump(exclude_defaults=True)
    query = {}
    for key in sorted(values):
        value = values[key]
        if key == "remap":
            value = ";".join(f"{new}={','.join(olds)}" for new, olds in value.items())
        elif isinstance(value, list | tuple):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        query[key] = str(value).lower() if isinstance(value, bool) else value
    text = kind + (f":{arg}" if arg else "")
    return text + (f"?{urlencode(query, safe=',;=:/')}" if query else "")


def _explain_options(kind: SourceKind, error: ValidationError) -> str:
    known = ", ".join(kind.options.model_fields)
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "options"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown option {where!r} (known: {known})")
        else:
            problems.append(f"option {where!r}: {item['msg']} (got {item.get('input')!r})")
    return f"source {kind.name}: " + "; ".join(problems)
