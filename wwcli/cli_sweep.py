"""The commands over a training run: `wwcli sweep` (every checkpoint of a run, a trajectory per
layer) and `wwcli compare` (two checkpoints, layer by layer), and the execution options every
analyzing command shares (--workers, --scheduler, --cache): which Runner the run layer gets.

Registered on cli.py's app (cli.py imports this module at its end); built from cli.py's
helpers, on `analysis.analyze_paths` and a Runner. Importing it imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import enum
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wwcli.cli import (
    EXECUTION,
    EXIT_CODES_HELP,
    GATE,
    INPUT,
    OUTPUT,
    ConfigOption,
    Conv1DMode,
    Conv1DOption,
    DebugOption,
    ImageFormat,
    IsolatedOption,
    JobsOption,
    LayersOption,
    MaxEvalsOption,
    MinEvalsOption,
    QuietOption,
    ReportFile,
    SchedulerOption,
    TrustPickleOption,
    UsageError,
    WorkersOption,
    _check_output_target,
    _Command,
    _file_option,
    _guard,
    _Run,
    _say_gate,
    _show_traceback,
    _write_atomically,
    app,
    gate_from_cli,
    settings_from_cli,
)
from wwcli.exit_codes import ExitCode
from wwcli.report.escape import printable

if TYPE_CHECKING:
    from wwcli.cache import ResultCache
    from wwcli.runners import Runner
    from wwcli.settings import RunSettings


class SweepFormat(enum.StrEnum):
    """What stdout carries for sweep and compare."""

    table = "table"
    csv = "csv"
    json = "json"


class SweepOrder(enum.StrEnum):
    """How a sweep orders its checkpoints."""

    natural = "natural"
    name = "name"
    mtime = "mtime"


class GateScope(enum.StrEnum):
    """Which checkpoints of a sweep the gate judges."""

    last = "last"
    all = "all"


# --- Execution: which runner ------------------------------------------------------------------


@dataclass
class Plan:
    """The runner of a run, and what to tell people about it afterwards."""

    runner: Runner
    """What runs the units (a cache in front, when asked)."""
    cache: ResultCache | None
    """The result cache, when the run uses one."""
    note: str = ""
    """Set when the workers or jobs asked for were lowered to fit the cores."""
    client: Any = None
    """The Dask client, closed when the run is over."""

    def finish(self, run: _Run) -> None:
        """The cache's line on stderr."""
        if self.cache is not None:
            run.info(self.cache.stats.line(self.cache.folder))


@contextlib.contextmanager
def execution_plan(
    run: _Run,
    *,
    units: int,
    settings: RunSettings,
    jobs: int | None,
    workers: int | None,
    scheduler: str | None,
    cache: Path | None,
    layers_per_task: int | None = None,
    spread: bool = True,
) -> Iterator[Plan]:
    """The runner for --jobs/--workers/--scheduler/--cache: a Dask cluster, a process pool or
    this process, the cache in front when a folder is given; closed (the Dask client) when the
    block ends. UsageError when the options do not fit together or the scheduler is not there.
    `spread`: with neither --workers nor --jobs, one worker per checkpoint (sweep) rather than
    one worker and every core for layers (analyze)."""
    from wwcli.runners import (
        DaskRunner,
        LocalRunner,
        ProcessRunner,
        RunnerError,
        plan_execution,
    )

    runner: Runner
    note = ""
    client = None
    if scheduler:
        if workers is not None:
            raise UsageError("--workers and --scheduler: the cluster's workers run the tasks")
        dask = DaskRunner(scheduler, jobs=jobs or 1, layers_per_task=layers_per_task)
        try:
            client = dask.connect()
        except RunnerError as error:
            raise UsageError(str(error)) from error
        runner = DaskRunner(
            scheduler, jobs=jobs or 1, layers_per_task=layers_per_task, client=client
        )
    else:
        if layers_per_task is not None:
            raise UsageError("--layers-per-task needs --scheduler (it splits a model into tasks)")
        try:
            execution = plan_execution(workers, jobs, units, spread=spread)
        except ValueError as error:
            raise UsageError(str(error)) from error
        note = execution.note
        runner = (
            LocalRunner(execution.jobs)
            if execution.workers == 1
            else ProcessRunner(execution.workers, execution.jobs)
        )
    result_cache = None
    if cache is not None:
        from wwcli.cache import CachingRunner, ResultCache

        result_cache = ResultCache(cache.expanduser())
        runner = CachingRunner(runner, result_cache, settings)
    if note:
        run.info(f"note: {note}")
    try:
        yield Plan(runner, result_cache, note, client)
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close(timeout=5)


def cache_folder(cache: Path | None, no_cache: bool) -> Path | None:
    """The cache folder of a sweep: --cache, or the default one; None with --no-cache."""
    if no_cache:
        return None
    if cache is not None:
        return cache
    from wwcli.cache import default_cache_dir

    return default_cache_dir()


LayersPerTaskOption = Annotated[
    int | None,
    typer.Option(
        "--layers-per-task",
        min=1,
        metavar="N",
        help="With --scheduler: split each checkpoint into tasks of N selected layers (a model "
        "too big for one worker); default: one task per checkpoint.",
        show_default=False,
        rich_help_panel=EXECUTION,
    ),
]
NoCacheOption = Annotated[
    bool,
    typer.Option(
        "--no-cache", help="Neither read nor write the result cache.", rich_help_panel=EXECUTION
    ),
]
SweepFormatOption = Annotated[
    SweepFormat,
    typer.Option("--format", "-f", help="What to print on stdout.", rich_help_panel=OUTPUT),
]
FailBelowOption = Annotated[
    str,
    typer.Option(
        "--fail-below",
        metavar="ALPHA|TYPE=ALPHA,...",
        help="The line: a gated layer with alpha below it trips the gate (and, in a sweep, "
        "counts as crossed); per layer type with dense=2,conv2d=1.8. Negative: off.",
        rich_help_panel=GATE,
    ),
]
GateMinEvalsOption = Annotated[
    int,
    typer.Option(
        "--gate-min-evals",
        min=0,
        metavar="N",
        help="Gate only layers with at least N eigenvalues (smaller ones are shown, not gated).",
        rich_help_panel=GATE,
    ),
]
GateIgnoreOption = Annotated[
    list[str] | None,
    typer.Option(
        "--gate-ignore",
        metavar="GLOB",
        help="Layer names the gate does not judge (kept in the report); repeatable.",
        show_default=False,
        rich_help_panel=GATE,
    ),
]
AllowEmptyOption = Annotated[
    bool,
    typer.Option("--allow-empty", help="Pass when the gate judged no layer.", rich_help_panel=GATE),
]
ExitZeroOption = Annotated[
    bool,
    typer.Option(
        "--exit-zero", help="Report, but always exit 0 unless an error.", rich_help_panel=GATE
    ),
]


def _run_settings(
    *,
    layers: str | None,
    min_evals: int,
    max_evals: int,
    trust_pickle: bool,
    conv1d: Conv1DMode,
    fail_below: str,
    exit_zero: bool,
    gate_min_evals: int,
    gate_ignore: list[str] | None,
    allow_empty: bool,
) -> RunSettings:
    """The run's settings from the options sweep and compare share (the gate's included)."""
    gate = gate_from_cli(
        fail_below=fail_below,
        exit_zero=exit_zero,
        gate_min_evals=gate_min_evals,
        gate_ignore=gate_ignore or (),
        allow_empty=allow_empty,
    )
    return settings_from_cli(
        layers=layers,
        min_evals=min_evals,
        max_evals=max_evals,
        trust_pickle=trust_pickle,
        conv1d=conv1d,
        gate=gate,
    )


def _targets(
    *pairs: tuple[Path | None, str, str],
) -> list[ReportFile]:
    return [ReportFile(path, option, kind) for path, option, kind in pairs if path is not None]


def _gate_line(run: _Run, outcome: Any) -> None:
    _say_gate(run, outcome, explain=False)
    if outcome.empty and outcome.code is ExitCode.ERROR:
        run.error(
            f"the gate judged no layer: {outcome.empty}; it would pass by accident "
            "(--gate-min-evals, --layers, or --allow-empty)"
        )


# --- sweep ------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def sweep(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="A run folder (its checkpoint files, and sub-folders: a model folder, or a "
            "folder holding one checkpoint file, is one checkpoint), globs (quote them: "
            "'run/ckpt-*.pt'), or checkpoints.",
            show_default=False,
            metavar="DIR|GLOB...",
        ),
    ],
    order: Annotated[
        SweepOrder,
        typer.Option(
            "--order",
            help="natural: by the numbers in the names (ckpt-2 before ckpt-10); name; mtime.",
            rich_help_panel=INPUT,
        ),
    ] = SweepOrder.natural,
    trust_pickle: TrustPickleOption = False,
    config: ConfigOption = None,
    isolated: IsolatedOption = False,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    conv1d: Conv1DOption = Conv1DMode.pooled,
    jobs: JobsOption = None,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    layers_per_task: LayersPerTaskOption = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            metavar="DIR",
            help="The result cache (default: $WWCLI_CACHE_DIR, else the user cache folder): "
            "a checkpoint analyzed before under the same settings is read from it.",
            show_default=False,
            file_okay=False,
            rich_help_panel=EXECUTION,
        ),
    ] = None,
    no_cache: NoCacheOption = False,
    fail_below: FailBelowOption = "2",
    gate_min_evals: GateMinEvalsOption = 64,
    gate_ignore: GateIgnoreOption = None,
    gate_scope: Annotated[
        GateScope,
        typer.Option(
            "--gate",
            help="Which checkpoints the gate judges: the last one, or all of them.",
            rich_help_panel=GATE,
        ),
    ] = GateScope.last,
    allow_empty: AllowEmptyOption = False,
    exit_zero: ExitZeroOption = False,
    output_format: SweepFormatOption = SweepFormat.table,
    csv_file: Annotated[
        Path | None,
        _file_option("--csv", "Also write the long-format trajectory as CSV.", panel=OUTPUT),
    ] = None,
    json_file: Annotated[
        Path | None,
        _file_option(
            "--json",
            "Also write the sweep as JSON (trajectory rows, crossings, checkpoints).",
            panel=OUTPUT,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="DIR",
            help="Also draw the trajectories (alpha with the 2 and 6 lines and the crossings "
            "marked; log_spectral_norm) into this folder (needs wwcli[plot]).",
            show_default=False,
            file_okay=False,
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    plot_format: Annotated[
        ImageFormat,
        typer.Option("--plot-format", help="File format of the pictures.", rich_help_panel=OUTPUT),
    ] = ImageFormat.png,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Analyze every checkpoint of a training run, in step order, and follow each layer (by
    name) across them: alpha, log_spectral_norm, D and num_pl_spikes per checkpoint (long
    format), and the layers whose alpha crossed below the line, with the first checkpoint where
    it did. The gate judges the last checkpoint (or all, with --gate all).

    Examples:

      wwcli sweep run/

      wwcli sweep 'run/checkpoint-*' --plot plots/ --json sweep.json

      wwcli sweep run/ --workers 4 --jobs 2

      wwcli sweep /shared/run/ --scheduler tcp://scheduler:8786
    """
    run = _Run(debug=debug, quiet=quiet)
    with _guard(run):
        from wwcli.sweep import SweepError, discover

        try:
            inputs = discover(paths, order=order.value)
        except SweepError as error:
            raise UsageError(str(error)) from error
        settings = _run_settings(
            layers=layers,
            min_evals=min_evals,
            max_evals=max_evals,
            trust_pickle=trust_pickle,
            conv1d=conv1d,
            fail_below=fail_below,
            exit_zero=exit_zero,
            gate_min_evals=gate_min_evals,
            gate_ignore=gate_ignore,
            allow_empty=allow_empty,
        )
        targets = _targets((csv_file, "--csv", "csv"), (json_file, "--json", "json"))
        for target in targets:
            _check_output_target(target, [item.path for item in inputs])
        if plot is not None:
            _check_plot(plot)
        with execution_plan(
            run,
            units=len(inputs),
            settings=settings,
            jobs=jobs,
            workers=workers,
            scheduler=scheduler,
            cache=cache_folder(cache, no_cache),
            layers_per_task=layers_per_task,
        ) as plan:
            code = _sweep(
                run,
                inputs,
                settings,
                plan,
                order.value,
                output_format,
                targets,
                plot,
                plot_format,
                gate_scope,
            )
    raise typer.Exit(code)


def _check_plot(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--plot {folder}: exists and is not a folder")
    from wwcli.report.plots import PlotError, require_matplotlib

    try:
        require_matplotlib()
    except PlotError as error:
        raise UsageError(str(error)) from error


def _sweep(
    run: _Run,
    inputs: Sequence[Any],
    settings: RunSettings,
    plan: Plan,
    order: str,
    output_format: SweepFormat,
    targets: Sequence[ReportFile],
    plot: Path | None,
    plot_format: ImageFormat,
    gate_scope: GateScope,
) -> ExitCode:
    from wwcli.analysis import analyze_paths
    from wwcli.gate import evaluate
    from wwcli.results import InputFailure, RunResult
    from wwcli.sweep import Sweep, render_csv, render_json, render_table, write_trajectory_plots

    reports = []
    failures = []
    total = len(inputs)
    outcomes = analyze_paths([item.path for item in inputs], settings, runner=plan.runner)
    for number, outcome in enumerate(outcomes, start=1):
        if isinstance(outcome, InputFailure):
            _show_traceback(run, outcome.traceback)
            run.error(outcome.message)
            failures.append(outcome)
            continue
        reports.append(outcome)
        run.info(f"[{number}/{total}] {outcome.checkpoint}: {len(outcome.layers)} layers analyzed")
    plan.finish(run)
    result = RunResult(settings, tuple(reports), tuple(failures))
    swept = Sweep(tuple(inputs), result, order=order)
    document = swept.to_document()
    rendered = {
        SweepFormat.table: lambda: render_table(swept),
        SweepFormat.csv: lambda: render_csv(document["trajectory"]),
        SweepFormat.json: lambda: render_json(document),
    }
    if reports:
        sys.stdout.write(rendered[output_format]())
    judged = result.reports[-1:] if gate_scope is GateScope.last else result.reports
    decision = evaluate(RunResult(settings, judged, result.failures))
    if failures:
        if reports:
            run.error("some checkpoints could not be read; no report files were written")
        return decision.code
    for target in targets:
        csv = target.file_format == "csv"
        _write_atomically(
            target.path, render_csv(document["trajectory"]) if csv else render_json(document)
        )
    if plot is not None:
        try:
            written = write_trajectory_plots(
                swept, plot.expanduser(), image_format=plot_format.value
            )
        except OSError as error:
            raise UsageError(f"--plot {plot}: cannot write: {error.strerror or error}") from error
        run.info(f"{len(written)} pictures written to {plot}")
    _gate_line(run, decision)
    return decision.code


# --- compare ----------------------------------------------------------------------------------


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def compare(
    a: Annotated[
        Path,
        typer.Argument(help="The base checkpoint.", show_default=False, metavar="A"),
    ],
    b: Annotated[
        Path,
        typer.Argument(
            help="The checkpoint to compare with it (a fine-tune).", show_default=False, metavar="B"
        ),
    ],
    trust_pickle: TrustPickleOption = False,
    config: ConfigOption = None,
    isolated: IsolatedOption = False,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    conv1d: Conv1DOption = Conv1DMode.pooled,
    jobs: JobsOption = None,
    max_drop: Annotated[
        float,
        typer.Option(
            "--max-drop",
            metavar="DELTA",
            help="Exit 1 when a gated layer's alpha fell by more than DELTA from A to B (or went "
            "below --fail-below where A was not). Negative: only the line.",
            rich_help_panel=GATE,
        ),
    ] = 0.5,
    fail_below: FailBelowOption = "2",
    gate_min_evals: GateMinEvalsOption = 64,
    gate_ignore: GateIgnoreOption = None,
    allow_empty: AllowEmptyOption = False,
    exit_zero: ExitZeroOption = False,
    output_format: SweepFormatOption = SweepFormat.table,
    csv_file: Annotated[
        Path | None,
        _file_option("--csv", "Also write the compared layers as CSV.", panel=OUTPUT),
    ] = None,
    json_file: Annotated[
        Path | None,
        _file_option("--json", "Also write the comparison as JSON.", panel=OUTPUT),
    ] = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Compare two checkpoints layer by layer (matched by name and shape): the change in alpha
    and log_spectral_norm, the distance between the weights (Frobenius norm of B - A, relative
    to A's; cosine) and the change in the top eigenvalues; the layers only one of them has.
    Exits 1 when a layer got worse (alpha fell by more than --max-drop, or newly below the line).

    Examples:

      wwcli compare base.safetensors finetuned.safetensors

      wwcli compare base/ finetuned/ --max-drop 0.3 --format json > diff.json
    """
    run = _Run(debug=debug, quiet=quiet)
    with _guard(run):
        from wwcli.compare import CompareInputError, render_csv, render_table
        from wwcli.compare import compare as compare_checkpoints
        from wwcli.runners import LocalRunner, default_jobs
        from wwcli.sweep import render_json

        settings = _run_settings(
            layers=layers,
            min_evals=min_evals,
            max_evals=max_evals,
            trust_pickle=trust_pickle,
            conv1d=conv1d,
            fail_below=fail_below,
            exit_zero=exit_zero,
            gate_min_evals=gate_min_evals,
            gate_ignore=gate_ignore,
            allow_empty=allow_empty,
        )
        targets = _targets((csv_file, "--csv", "csv"), (json_file, "--json", "json"))
        for target in targets:
            _check_output_target(target, [a, b])
        try:
            comparison = compare_checkpoints(
                a,
                b,
                settings,
                runner=LocalRunner(jobs or default_jobs()),
                max_drop=max_drop if max_drop >= 0 else None,
            )
        except CompareInputError as error:
            for failure in error.failures:
                _show_traceback(run, failure.traceback)
                run.error(failure.message)
            raise typer.Exit(ExitCode.ERROR) from None
        document = comparison.to_document(settings)
        rendered = {
            SweepFormat.table: lambda: render_table(comparison),
            SweepFormat.csv: lambda: render_csv(comparison),
            SweepFormat.json: lambda: render_json(document),
        }
        sys.stdout.write(rendered[output_format]())
        for target in targets:
            text = render_csv(comparison) if target.file_format == "csv" else render_json(document)
            _write_atomically(target.path, text)
        for trip in comparison.outcome.trips:
            run.stderr.print(
                printable(f"worse: layer {trip.name}: {trip.reason}"), markup=False, highlight=False
            )
        _gate_line(run, dataclasses_replace_trips(comparison.outcome))
        code = comparison.outcome.code
    raise typer.Exit(code)


def dataclasses_replace_trips(outcome: Any) -> Any:
    """The outcome without its trips (compare prints them as "worse:" lines itself)."""
    import dataclasses

    return dataclasses.replace(outcome, trips=())
