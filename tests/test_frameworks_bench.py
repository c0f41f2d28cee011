"""Frameworks and graph modes as dimensions of an experiment: the matrix, the run keys, the
records, and the report's framework section (from records; the Keras runs themselves are
tested in test_keras_run.py, and end to end in test_frameworks_end_to_end below)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from loadbench.bench.experiment import Experiment
from loadbench.bench.matrix import expand, plan_runs
from loadbench.report.data import load_results
from loadbench.report.render import write_report

TINY = "synthetic:cifar-like?count=96&eval_count=32&size=12&classes=3"
HAS_KERAS = importlib.util.find_spec("tensorflow") is not None


def make(**values) -> Experiment:
    return Experiment.model_validate({"datasets": [{"source": TINY, "name": "tiny"}],
                                      "repeats": 1, **values})  # fmt: skip


def test_torch_eager_runs_keep_the_keys_they_had_before_the_dimensions():
    (plain,) = plan_runs(make(formats=["npy"]), expand(make(formats=["npy"])))
    assert "framework" not in plain.settings() and "graph" not in plain.settings()
    compiled = make(formats=["npy"], train={"compile": True})
    (old,) = plan_runs(compiled, expand(compiled))
    assert old.cell.graph == "compiled" and "graph" not in old.settings()
    both = make(formats=["npy"], graph=["eager", "compiled"])
    keys = {spec.cell.graph: spec for spec in plan_runs(both, expand(both))}
    assert keys["eager"].key == plain.key
    assert keys["compiled"].settings()["graph"] == "compiled"
    assert keys["compiled"].record().graph == "compiled"
    assert keys["compiled"].record().framework == "torch"


def test_compile_and_a_graph_list_that_disagree_are_refused():
    with pytest.raises(ValueError, match="train: {compile: true} and graph: say one thing"):
        make(formats=["npy"], graph=["eager"], train={"compile": True})
    with pytest.raises(ValueError, match="framework, graph are set by the matrix"):
        make(formats=["npy"], train={"framework": "keras", "graph": "xla"})


def test_what_cannot_train_is_marked_with_the_reason():
    exp = make(formats=["npy", "tf-data", "torchvision-imagefolder"], access=["sample", "device"],
               framework=["torch", "keras"], graph=["eager", "compiled", "xla"])  # fmt: skip
    why = {(c.format, c.access, c.framework, c.graph): c.skip for c in expand(exp)}
    assert "xla is Keras' jit_compile" in why[("npy", "sample", "torch", "xla")]
    assert why[("npy", "sample", "torch", "compiled")] is None
    if HAS_KERAS:
        assert why[("npy", "sample", "keras", "xla")] is None
        assert why[("tf-data", "sample", "keras", "eager")] is None
        other = why[("torchvision-imagefolder", "sample", "keras", "compiled")]
        assert "another project's torch pipeline" in other
        assert "--access device" in why[("npy", "device", "keras", "eager")]


def test_ceilings_have_one_loader_twin_per_loader_and_a_compute_run_per_torch_graph():
    exp = make(formats=["npy", "lmdb"], framework=["torch", "keras"], graph=["eager", "compiled"],
               ceilings=True)  # fmt: skip
    cells = expand(exp)
    loaders = [c for c in cells if c.mode == "loader-only"]
    assert sorted(c.format for c in loaders) == ["lmdb", "npy"]
    compute = [c for c in cells if c.mode == "compute-only"]
    assert sorted(c.graph for c in compute) == ["compiled", "eager"]
    assert all(c.framework == "torch" for c in compute)
    keys = [spec.key for spec in plan_runs(exp, cells)]
    assert len(keys) == len(set(keys))  # no two runs share a key


def write_results(path, epochs: dict[tuple[str, str, str], list[float]]) -> None:
    """Runs of dataset "d": (format, framework, graph) -> one repeat per epoch time."""
    path.mkdir()
    (path / "bench.json").write_text('{"schema": 1}')
    lines = []
    for (fmt, framework, graph), times in epochs.items():
        for repeat, time_s in enumerate(times):
            lines.append({
                "key": f"{fmt}-{framework}-{graph}-{repeat}", "status": "ok", "dataset": "d",
                "format": fmt, "dtype": "uint8", "access": "sample", "workers": 0,
                "cache": "warm", "mode": "train", "repeat": repeat, "seed": repeat,
                "framework": framework, "graph": graph,
                "final": {"accuracy": 0.9, "compile_time_s": 1.5 if graph != "eager" else 0.0},
                "epochs": [{"epoch": 1, "time_s": 2 * time_s, "timing": "sync"},
                           {"epoch": 2, "time_s": time_s, "data_wait_s": 0.1 * time_s}],
            })  # fmt: skip
    (path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_report_has_a_framework_section_with_tested_findings(tmp_path):
    rng = np.random.default_rng(0)

    def times(median):
        return list(median * (1 + 0.01 * rng.standard_normal(8)))

    same = times(1.0)
    write_results(tmp_path / "r", {
        ("tfrecord", "torch", "eager"): same,
        ("tfrecord", "torch", "compiled"): same[::-1],
        ("tfrecord", "keras", "eager"): times(3.0),
        ("tfrecord", "keras", "compiled"): times(1.5),
        ("tf-data", "keras", "compiled"): times(1.2),
    })  # fmt: skip
    results = load_results(str(tmp_path / "r"))
    assert set(results.runs["framework"]) == {"torch", "keras"}
    built, _ = write_report(str(tmp_path / "r"), str(tmp_path / "out"), ("md",))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Frameworks and graph modes" in md
    assert (tmp_path / "out" / "plots" / "d-frameworks.png").is_file()
    table = next(s.table for s in built.sections if s.title == "Frameworks and graph modes")
    rows = {(r[1], r[2], r[3]): r for r in table.rows}
    assert rows[("tfrecord/uint8/sample/w0", "torch", "eager")][5] == "1 (baseline)"
    keras_eager = rows[("tfrecord/uint8/sample/w0", "keras", "eager")][5]
    assert abs(float(keras_eager.partition("x")[0]) - 3.0) < 0.1 and keras_eager.endswith("*")
    assert rows[("tfrecord/uint8/sample/w0", "keras", "compiled")][8] == "1.500"
    assert rows[("tf-data/uint8/sample/w0 (peer, own order)", "keras", "compiled")][5] == "-"
    text = " ".join(built.findings)
    # torch eager and compiled took the same time: not called different
    assert (
        "tfrecord/uint8/sample/w0 and tfrecord/uint8/sample/w0/compiled (torch: compiled "
        "against eager) are indistinguishable"
    ) in text
    assert (
        "tfrecord/uint8/sample/w0 was faster than tfrecord/uint8/sample/w0/keras-eager "
        "(torch against keras, both eager)"
    ) in text
    assert (
        "tfrecord/uint8/sample/w0/keras-compiled was faster than "
        "tfrecord/uint8/sample/w0/keras-eager (keras: compiled against eager)"
    ) in text


def test_results_trained_one_way_have_no_framework_section(tmp_path):
    write_results(tmp_path / "r", {("npy", "torch", "eager"): [1.0, 1.1],
                                   ("lmdb", "torch", "eager"): [1.2, 1.3]})  # fmt: skip
    built, _ = write_report(str(tmp_path / "r"), str(tmp_path / "out"), ("md",))
    assert not any(s.title == "Frameworks and graph modes" for s in built.sections)
    assert "framework" not in " ".join(built.findings)
