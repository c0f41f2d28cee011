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
        bool, typer.Option("--dry-run", help="Show the matrix, run nothing.")
    ] = False,
) -> None:
    """Run an experiment: convert what is missing, then every run in its own process, with telemetry.

    Re-running the same command skips finished runs, so a killed experiment resumes. One bench
    writes a results directory at a time: a second one on the same --out is refused.

    Examples:
      [bold]loadbench bench[/bold]                                   (the built-in experiment)
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
    stdout.print(
        f"experiment [bold]{exp.name}[/bold]: {len(cells) - len(skipped)} combinations x "
        f"{exp.repeats} repeats = {len(runs)} runs, {exp.epochs} epoch(s) each, mode {exp.mode}"
    )
    for cell in skipped:
        stdout.print(f"[yellow]not run:[/yellow] {cell.label}: {cell.skip}", highlight=False)
    if dry_run:
        for spec in runs:
            stdout.print(
                f"  {spec.key}  {spec.cell.label}  repeat {spec.repeat + 1}", highlight=False
            )
    return skipped


def _print_report(results_dir: str, out_dir: str | None = None, formats=("md", "html"),
                  compare: str | None = None) -> None:  # fmt: skip
    """Write the report and show its summary table and where it is."""
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
    if report.failed:
        stdout.print(f"[red]{len(report.failed.rows)} failed run(s)[/red] are listed in the report")
    for kind, path in written.items():
        stdout.print(f"report ({kind}): {path}", highlight=False)


@app.command()
def report(
    results_dir: Annotated[str, typer.Argument(help="A results directory of loadbench bench.")],
    out_dir: Annotated[
        str | None, typer.Option("--out", help="Where to write (RESULTS_DIR/report).")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="md, html, or md,html.")] = "md,html",
    compare: Annotated[
        str | None, typer.Option(help="Another results directory to put side by side.")
    ] = None,
) -> None:
    """Turn a results directory into report.md and a self-contained report.html.

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
