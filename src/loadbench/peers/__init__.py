"""Peer loaders: other projects' own libraries, run as their users run them, over the same data.

Each peer is one module here that registers a `PeerFormat` (a format of the benchmark matrix:
`--format peers`) and lists its library in `requires`, plus its line in
`loadbench.formats.MODULES` and its pip name in the `peers` extra. Its reader's `loader()`
returns the library's own pipeline, which the training loop uses instead of loadbench's; the
pipeline brings its own shutdown (`close()`).

Peers sit above the training harness: they may use its epoch order and samplers, and nothing
below them (formats, storage, training) imports them. Their libraries, and torch, are imported
inside the readers and writers, so listing formats imports none of them.
"""
