"""The benchmark commands: `bench` (run an experiment, then report) and `report`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from loadbench.cli.app import app, stdout
from loadbench.errors import LoadbenchError


@app.command()
def bench(
    experiment: Annotated[
        str | None, typer.Argument(help="An experiment YAML (default: the built-in one).")
    ] = None,
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Results directory (results/<experiment name>).")
    ] = None,
    stores: Annotated[
        str | None,
        typer.Option(
            help="Where converted stores are kept and reused (~/.cache/loadbench/stores)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the runs and their estimated time; run nothing.")
    ] = False,
    calibrate: Annotated[
        bool, typer.Option(help="With --dry-run: time batches here for what --out has not run.")
    ] = True,
) -> None:
    """Run an experiment: convert what is missing, then every run in its own process, with telemetry.

    Re-running the same command skips finished runs, so a killed experiment resumes. One bench
    writes a results directory at a time: a second one on the same --out is refused. --dry-run
    says how many runs are left and about how long they take.

    Examples:
      [bold]loadbench bench[/bold]                                   (the built-in experiment)
      [bold]loadbench bench configs/thesis.yaml --dry-run[/bold]     (runs and time, run nothing)
      [bold]loadbench bench configs/thesis.yaml --out results/thesis[/bold]
    """
    import os

    from loadbench import progress
    from loadbench.bench.experiment import load_experiment
    from loadbench.bench.runner import run_experiment

    exp = load_experiment(experiment)
    results = out_dir or os.path.join("results", exp.name)
    skipped = _print_plan(exp, dry_run)
    if dry_run:
        _print_estimate(exp, results, stores, calibrate)
        return
    with progress.enabled():
        outcome = run_experiment(exp, results, stores)
    for label, why in outcome.not_run:
        if not any(label == c.label for c in skipped):
            stdout.print(f"[yellow]not run:[/yellow] {label}: {why}", highlight=False)
    _print_report(results)
    stdout.print(
        f"{outcome.ok} run(s) done, {outcome.failed} failed, {outcome.skipped_done} already "
        f"done before; results in {results}"
    )
    if outcome.failed:
        raise typer.Exit(1)


def _print_plan(exp, dry_run: bool) -> list:
    """The matrix in one line, the cells that will not run and why; with `dry_run`, every run.
    Returns the cells not run."""
    from loadbench.bench.matrix import expand, plan_runs

    cells = expand(exp)
    runs = plan_runs(exp, cells)
    skipped = [c for c in cells if c.skip]
    combinations = len(cells) - len(skipped)
    least, most = exp.repeat_range()
    if exp.adaptive:
        repeats = (
            f"{least}-{most} repeats (more while the 95% interval of a median epoch time is "
            f"wider than {exp.adaptive.ci_pct:g}% of it) = between {combinations * least} and "
            f"{len(runs)} runs"
        )
    else:
        repeats = f"{most} repeats = {len(runs)} runs"
    stdout.print(
        f"experiment [bold]{exp.name}[/bold]: {combinations} combinations x {repeats}, "
        f"{exp.epochs} epoch(s) each, mode {exp.mode}"
    )
    for cell in skipped:
        stdout.print(f"[yellow]not run:[/yellow] {cell.label}: {cell.skip}", highlight=False)
    if dry_run:
        for spec in runs:
            maybe = "  (if its interval needs it)" if spec.repeat >= least else ""
            stdout.print(
                f"  {spec.key}  {spec.cell.label}  repeat {spec.repeat + 1}{maybe}",
                highlight=False,
            )
    return skipped


def _print_estimate(exp, results_dir: str, stores_dir: str | None, calibrate: bool) -> None:
    """The runs left and their estimated wall time (see `bench/estimate.py`), and what could not
    be priced and why; nothing when nothing is priced and the calibration is off."""
    from loadbench.bench.estimate import estimate, say_seconds
    from loadbench.bench.runner import default_stores_dir

    found = estimate(exp, results_dir, stores_dir or default_stores_dir(), calibrate)
    if not found.how and not calibrate:
        return
    (least, most), (low, high) = found.runs, found.total_s
    runs = f"{most}" if least == most else f"between {least} and {most}"
    took = f"; calibrated in {found.took_s:.0f} s" if found.how["calibrated here"] else ""
    if not most:
        stdout.print(f"estimate: nothing left to run ({found.done} runs done before)")
    elif found.known:
        stdout.print(
            f"estimate: {runs} runs left ({found.done} done before), about "
            f"[bold]{_span(low, high)}[/bold] (runs {_span(*found.run_s)}, conversions "
            f"{say_seconds(found.convert_s)}, start {say_seconds(found.start_s)}{took})",
            highlight=False,
        )
        priced = ", ".join(f"{n} {how}" for how, n in found.how.items())
        stdout.print(f"  combinations priced: {priced}", highlight=False)
        for note in found.notes:
            stdout.print(f"  ({note})", highlight=False)
    else:
        stdout.print(f"estimate: {runs} runs left; no time could be estimated{took}")
    for why, n in found.unknown.items():
        stdout.print(f"[yellow]not estimated:[/yellow] {n} combination(s): {why}", highlight=False)
    if found.unknown and found.known:
        stdout.print("  (the time above leaves those out)", highlight=False)


def _span(low: float, high: float) -> str:
    from loadbench.bench.estimate import say_seconds

    return say_seconds(high) if round(low) == round(high) else (
        f"{say_seconds(low)} to {say_seconds(high)}")  # fmt: skip


def _print_report(results_dir: str, out_dir: str | None = None, formats=("md", "html"),
                  compare: str | None = None) -> None:  # fmt: skip
    """Write the report and show its summary table, with --compare whether each dataset's
    ranking agrees, and where it all is."""
    from loadbench.report.render import write_report

    report, written = write_report(results_dir, out_dir, formats, compare)
    for note in report.results.notes:
        stdout.print(f"[yellow]missing:[/yellow] {note}", highlight=False)
    for table in (report.summary, report.compare):
        if table is None:
            continue
        rich_table = Table(title=table.title)
        for i, column in enumerate(table.columns):
            rich_table.add_column(column, justify="left" if i == 0 else "right")
        for row in table.rows:
            rich_table.add_row(
                *(
                    c.replace("**", "") if "**" not in c else f"[bold]{c.strip('*')}[/bold]"
                    for c in row
                )
            )
        stdout.print(rich_table)
    for verdict in report.verdicts:
        stdout.print(verdict, highlight=False)
    if report.failed:
        stdout.print(f"[red]{len(report.failed.rows)} failed run(s)[/red] are listed in the report")
    for kind, path in written.items():
        stdout.print(f"report ({kind}): {path}", highlight=False)
    if report.card_file:
        stdout.print(f"result card: {report.card_file}", highlight=False)


@app.command()
def report(
    results_dir: Annotated[str, typer.Argument(help="A results directory of loadbench bench.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Where to write (RESULTS_DIR/report).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="md, html, or md,html.")] = "md,html",
    compare: Annotated[
        str | None,
        typer.Option(
            help="Another results directory to put side by side: epoch times, and whether the rankings agree."
        ),
    ] = None,
) -> None:
    """Turn a results directory into report.md, a self-contained report.html and card.json.

    card.json, the result card, holds what it takes to check or reproduce the numbers: machine,
    versions, commit, dataset hashes, seeds, protocol, and each dataset's ranking with 95%
    intervals. --compare says per dataset whether the two rankings agree.

    Writes only into --out (by default the report folder of the results directory), so results
    on a read-only file system are reported with --out elsewhere.

    Examples:
      [bold]loadbench report results/default[/bold]
      [bold]loadbench report results/laptop --compare results/server --out report-both[/bold]
    """
    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    unknown = sorted(set(formats) - {"md", "html"})
    if unknown or not formats:
        raise LoadbenchError(f"--format {format!r}: choose md, html or md,html")
    _print_report(results_dir, out_dir, formats, compare)
