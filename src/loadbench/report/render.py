"""`loadbench report`: a results directory as `report.md` (images linked) and `report.html` (one
self-contained file, images embedded), with the environment, the experiment, the findings,
the summary and per-dataset tables and plots, the failed runs and the result card (also as
`card.json`: what it takes to check or reproduce the numbers)."""

from __future__ import annotations

import base64
import contextlib
import html
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import yaml

from loadbench.errors import explain_os_error
from loadbench.report.agreement import compare_cards, rankings_table
from loadbench.report.bounds import bounds_table
from loadbench.report.card import (
    CARD,
    ResultCard,
    build_card,
    card_lines,
    card_of,
    ranking_tables,
    write_card,
)
from loadbench.report.data import CONFIG, Results, load_results, planned_repeats, warm_only
from loadbench.report.findings import findings
from loadbench.report.frameworks import (
    framework_findings,
    framework_table,
    has_frameworks,
    plot_frameworks,
)
from loadbench.report.plots import plot_dataset, plot_storage
from loadbench.report.tables import (
    Table,
    aggregate,
    config_name,
    dataset_table,
    summary_table,
)
from loadbench.util import interrupts_held, pid_alive


@dataclass
class Section:
    title: str
    table: Table | None = None
    images: dict[str, str] = field(default_factory=dict)  # caption -> path
    text: list[str] = field(default_factory=list)
    more: list[Table] = field(default_factory=list)  # tables after the images (bounds)


@dataclass
class Report:
    title: str
    results: Results
    summary: Table | None
    findings: list[str]
    sections: list[Section]
    failed: Table | None
    compare: Table | None = None
    other: Results | None = None
    card: ResultCard | None = None
    rankings: Table | None = None  # with --compare: do the two cards rank alike
    verdicts: list[str] = field(default_factory=list)  # one line per dataset ranked in both
    card_file: str | None = None  # card.json, once published


def build(results: Results, out_dir: str, other: Results | None = None) -> Report:
    plots_dir = os.path.join(out_dir, "plots")
    has_runs = len(results.runs) > 0
    sections = []
    for ds in results.datasets:
        images = plot_dataset(results, ds, plots_dir)
        bounds = bounds_table(results, ds)
        sections.append(Section(ds, dataset_table(results, ds), images,
                                more=[bounds] if bounds else []))  # fmt: skip
    if has_frameworks(results):  # trained more than one way: torch/keras, eager/compiled
        sections.append(Section("Frameworks and graph modes", framework_table(results),
                                plot_frameworks(results, plots_dir)))  # fmt: skip
    storage = plot_storage(results, plots_dir) if has_runs else None
    if storage:
        sections.append(Section("Storage size", None, {"bytes per image on disk": storage}))
    report = Report(
        title=f"loadbench report: {results.experiment.get('name', os.path.basename(results.path))}",
        results=results,
        summary=summary_table(results) if has_runs else None,
        findings=findings(results) + framework_findings(results) if has_runs else [],
        sections=sections,
        failed=failed_table(results),
        compare=compare_table(results, other) if other is not None else None,
        other=other,
        card=build_card(results),
    )
    if other is not None:
        other_card, source = card_of(other)
        comparisons = compare_cards(report.card, other_card)
        report.rankings = rankings_table(comparisons, report.card, other_card, source)
        report.verdicts = [c.verdict() for c in comparisons]
    return report


def failed_table(results: Results) -> Table | None:
    if not results.failed:
        return None
    rows = []
    for r in results.failed:
        what = f"{r.dataset} {r.format}/{r.dtype}/{r.access}"
        what += f"/w{r.workers} {r.cache} repeat {(r.repeat or 0) + 1}"
        rows.append([what, str(r.error or "?")[:300]])
    return Table("Failed runs", ["run", "error"], rows)


def compare_table(a: Results, b: Results) -> Table:
    """Median steady-state epoch time of every (dataset, configuration) both directories ran."""

    def stats(results):
        return aggregate(warm_only(results.runs), ["dataset", *CONFIG]).set_index(
            ["dataset", *CONFIG]
        )

    left, right = stats(a), stats(b)
    common = left.index.intersection(right.index)
    rows = []
    for key in common:
        ea, eb = left.loc[key, "epoch_s"], right.loc[key, "epoch_s"]
        ratio = eb / ea if ea and ea == ea and eb == eb else float("nan")
        ds, *config = key
        name = config_name(dict(zip(CONFIG, config, strict=True)))
        rows.append([ds, name, f"{ea:.3f}", f"{eb:.3f}",
                     f"{ratio:.2f}x" if ratio == ratio else "-"])  # fmt: skip
    notes = [f"A: {a.path} ({_machine(a)}); B: {b.path} ({_machine(b)}). B/A > 1: B is slower."]
    if not rows:
        notes.append("The two directories have no configuration in common.")
    return Table("Comparison: median epoch time (s)", ["dataset", "configuration", "A", "B",
                 "B / A"], rows, notes)  # fmt: skip


def _card_section(report: Report) -> list[Section]:
    """The result card as a section (none without a card)."""
    if report.card is None:
        return []
    text = [f"What it takes to check or reproduce these numbers; all of it, as JSON, in {CARD} "
            "beside this report.", *card_lines(report.card)]  # fmt: skip
    return [Section("Result card", text=text, more=ranking_tables(report.card))]


def _machine(results: Results) -> str:
    env = results.env
    if not env:
        return "machine unknown"
    gpus = ", ".join(g["name"] for g in env.get("gpus") or []) or "no GPU"
    return f"{env.get('cpu', '?')}, {env.get('cores_logical', '?')} cores, {gpus}"


def _environment_lines(results: Results) -> list[str]:
    env = results.env
    if not env:
        return ["The environment was not recorded (env.json is missing)."]
    gpus = ", ".join(
        f"{g['name']} ({g['memory_bytes'] / 2**30:.0f} GiB)" for g in env.get("gpus") or []
    )
    fs = env.get("stores_filesystem") or {}
    return [
        f"CPU: {env.get('cpu')} ({env.get('cores_logical')} logical cores, "
        f"{env.get('torch_threads')} torch threads); RAM {env.get('ram_bytes', 0) / 2**30:.1f} GiB",
        f"GPU: {gpus or 'none'}",
        f"Software: loadbench {env.get('loadbench')} (commit {str(env.get('git_commit'))[:10]}), "
        f"Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
        f"{env.get('os')}",
        f"Stores on: {fs.get('type', '?')} ({fs.get('device', '?')} at "
        f"{fs.get('mountpoint', '?')})",
    ]


def _overview(report: Report) -> list[str]:
    r = report.results
    exp = r.experiment
    repeats = r.runs.groupby(["dataset", *CONFIG, "cache"]).size() if len(r.runs) else []
    lines = [
        f"Results: {r.path}; generated {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        f"{len(r.runs)} finished run(s), {len(r.failed)} failed; repeats per configuration: "
        + (f"{min(repeats)}-{max(repeats)}" if len(repeats) else "none")
        + (f" (the experiment asked for {planned_repeats(exp)})" if exp.get("repeats") else "")
        + f"; mode {exp.get('mode', '?')}, {exp.get('epochs', '?')} epoch(s) per run.",
    ]
    return lines


# -- Markdown ------------------------------------------------------------------------------------


def _md_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    for note in table.notes:
        lines += ["", f"*{note}*"]
    return lines


def to_markdown(report: Report, out_dir: str) -> str:
    r = report.results
    lines = [f"# {report.title}", ""]
    lines += _overview(report) + [""]
    lines += [f"> **Missing:** {note}" for note in r.notes] + ([""] if r.notes else [])
    lines += ["## Environment", ""] + [f"- {line}" for line in _environment_lines(r)] + [""]
    if report.findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in report.findings] + [""]
    if report.summary:
        lines += [f"## {report.summary.title}", ""] + _md_table(report.summary) + [""]
    for table in (report.compare, report.rankings):
        if table:
            lines += [f"## {table.title}", ""] + _md_table(table) + [""]
    lines += [f"- {verdict}" for verdict in report.verdicts] + ([""] if report.verdicts else [])
    for section in [*report.sections, *_card_section(report)]:
        lines += [f"## {section.title}", ""] + [f"- {text}" for text in section.text]
        lines += [""] if section.text else []
        if section.table:
            lines += _md_table(section.table) + [""]
        for caption, path in section.images.items():
            lines += [f"![{caption}]({os.path.relpath(path, out_dir)})", ""]
        for table in section.more:
            lines += [f"### {table.title}", ""] + _md_table(table) + [""]
    if report.failed:
        lines += [f"## {report.failed.title}", ""] + _md_table(report.failed) + [""]
    lines += ["## Experiment", "", "```yaml", yaml.safe_dump(r.experiment, sort_keys=False).strip(),
              "```", ""]  # fmt: skip
    return "\n".join(lines)


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f2f2f2; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
tr:first-child td { background: #f6fff0; }
.note { color: #555; font-size: 0.85em; margin: 0.2em 0; }
.missing { background: #fff6e0; padding: 0.5em; border-left: 4px solid #e0a000; }
img { max-width: 100%; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def _html_cell(text: str) -> str:
    escaped = html.escape(str(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in table.notes)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def _embedded(path: str, caption: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'


def to_html(report: Report) -> str:
    r = report.results
    parts = [f"<h1>{html.escape(report.title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in _overview(report)]
    parts += [f'<p class="missing"><b>Missing:</b> {html.escape(n)}</p>' for n in r.notes]
    parts.append("<h2>Environment</h2><ul>")
    parts += [f"<li>{html.escape(line)}</li>" for line in _environment_lines(r)]
    parts.append("</ul>")
    if report.findings:
        parts.append("<h2>Findings</h2><ul>")
        parts += [f"<li>{html.escape(f)}</li>" for f in report.findings]
        parts.append("</ul>")
    for table in (report.summary, report.compare, report.rankings):
        if table:
            parts.append(f"<h2>{html.escape(table.title)}</h2>{_html_table(table)}")
    if report.verdicts:
        parts.append("<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in report.verdicts))
        parts.append("</ul>")
    for section in [*report.sections, *_card_section(report)]:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in section.text))
            parts.append("</ul>")
        if section.table:
            parts.append(_html_table(section.table))
        parts += [_embedded(path, caption) for caption, path in section.images.items()]
        parts += [f"<h3>{html.escape(t.title)}</h3>{_html_table(t)}" for t in section.more]
    if report.failed:
        parts.append(f"<h2>{html.escape(report.failed.title)}</h2>{_html_table(report.failed)}")
    experiment = yaml.safe_dump(r.experiment, sort_keys=False)
    parts.append(f"<h2>Experiment</h2><pre>{html.escape(experiment)}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def write_report(
    results_dir: str,
    out_dir: str | None = None,
    formats: tuple[str, ...] = ("md", "html"),
    compare: str | None = None,
) -> tuple[Report, dict[str, str]]:
    """Build the report of `results_dir` into `out_dir` (default RESULTS_DIR/report), which is
    all it writes.

    The report appears whole or not at all: its plots and pages are made in a staging folder
    in `out_dir` and moved into place with Ctrl-C held off, pages last (they are what says the
    report is complete). An interrupted or failed report leaves the one before intact; a
    killed one leaves a `.report.partial-PID` folder, which the next report removes.
    """
    results = load_results(results_dir)
    other = load_results(compare) if compare else None
    out = os.path.abspath(out_dir or os.path.join(results.path, "report"))
    with _writing_report(out, default=out_dir is None):
        os.makedirs(out, exist_ok=True)
        _remove_stale_staging(out)
        staging = os.path.join(out, f"{STAGING}{os.getpid()}")
        try:
            os.mkdir(staging)
            report = build(results, staging, other)
            pages = {"card": write_card(report.card, os.path.join(staging, CARD))}
            if "md" in formats:
                pages["md"] = _write(os.path.join(staging, "report.md"),
                                     to_markdown(report, staging))  # fmt: skip
            if "html" in formats:
                pages["html"] = _write(os.path.join(staging, "report.html"), to_html(report))
            written = _publish(report, staging, out, pages)
            report.card_file = written.pop("card")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report, written


STAGING = ".report.partial-"


def _publish(report: Report, staging: str, out: str, pages: dict[str, str]) -> dict[str, str]:
    """Move the staged plots, then the pages (card.json first), from `staging` into `out`;
    the plots of an earlier report go (into `staging`, removed with it)."""
    moved = {kind: os.path.join(out, os.path.basename(path)) for kind, path in pages.items()}
    plots, staged_plots = os.path.join(out, "plots"), os.path.join(staging, "plots")
    with interrupts_held():
        if os.path.isdir(plots):
            os.rename(plots, os.path.join(staging, "plots.old"))
        if os.path.isdir(staged_plots):
            os.rename(staged_plots, plots)
        for kind, path in pages.items():
            os.replace(path, moved[kind])
    for section in report.sections:
        section.images = {caption: os.path.join(out, os.path.relpath(path, staging))
                          for caption, path in section.images.items()}  # fmt: skip
    return moved


def _remove_stale_staging(out: str) -> None:
    """The staging folders of reports that were killed."""
    for name in os.listdir(out):
        pid = name.removeprefix(STAGING)
        if name.startswith(STAGING) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)


@contextlib.contextmanager
def _writing_report(out: str, default: bool) -> Iterator[None]:
    """A place the report cannot be written (read-only, full, not a folder) as one error; at
    the default place, inside the results directory, with the way out: --out."""
    try:
        yield
    except OSError as e:
        explained = explain_os_error(e, out, "writing the report to")
        if explained is None:
            raise
        hint = "; or pass --out DIR to write the report elsewhere" if default else ""
        raise type(explained)(f"{explained}{hint}") from None


def _write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
