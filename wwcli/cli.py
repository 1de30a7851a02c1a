"""The `wwcli` command line: parses options, wires loaders, engine, reports and the gate.

stdout carries data only (the table, CSV or JSON); progress, warnings, errors and the summary
of a csv/json run go to stderr.
"""

from __future__ import annotations

import enum
import os
import signal
import stat
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from wwcli import __version__
from wwcli.gate import ExitCode, GatePolicy, exit_code, trip_reason
from wwcli.report.escape import printable

if TYPE_CHECKING:
    from wwcli.engine import EngineOptions
    from wwcli.loaders import LayerSpec
    from wwcli.loaders.interface import Checkpoint

EXIT_CODES_HELP = (
    "Exit codes: 0 no layer tripped the gate; 1 the gate tripped (a layer with alpha below "
    "--fail-below, above --fail-above, or a failed fit with --fail-on-failed-fit); 2 usage "
    "error, or an input that is missing, unreadable, unsupported or unsafe."
)

app = typer.Typer(
    name="wwcli",
    help=(
        "Heavy-tailed spectral diagnostics for saved neural-network checkpoints: the power-law "
        "exponent alpha of every weight matrix's eigenvalue spectrum, as weightwatcher 0.7.7 "
        "computes it. alpha < 2 marks a very heavy-tailed layer, possibly over-trained.\n\n"
        + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


class OutputFormat(enum.StrEnum):
    """What stdout carries."""

    table = "table"
    csv = "csv"
    json = "json"


class Device(enum.StrEnum):
    """Where eigenvalues are computed."""

    cpu = "cpu"
    cuda = "cuda"


class Precision(enum.StrEnum):
    """Floating-point precision of the Gram matrix and its eigensolve."""

    float64 = "float64"
    float32 = "float32"


class UsageError(Exception):
    """A bad option value or combination; reported with exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM handler: stop the run as Ctrl-C does."""
    raise Terminated()


death_signal: int | None = None
"""Set when the command stopped because of a signal (SIGINT, SIGTERM, SIGPIPE): after clean-up,
the executable (wwcli/entry.py) dies by that signal, so a shell loop over checkpoints stops as
it does for any Unix tool."""


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"wwcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Heavy-tailed spectral diagnostics (alpha) for saved neural-network checkpoints."""


# Options shared by describe and analyze.
PathsArgument = Annotated[
    list[Path],
    typer.Argument(
        help="Checkpoint files (.keras .h5 .weights.h5 .pt .pth .bin .ckpt .safetensors) or "
        "model folders (sharded safetensors with an index, Hugging Face folders).",
        show_default=False,
        metavar="PATH",
    ),
]
LayersOption = Annotated[
    str | None,
    typer.Option(
        "--layers",
        "-l",
        metavar="EXPR",
        help="Which layers: ids (1), lists (1,3), ranges (2-5), names or globs "
        "(encoder.*.query), types (dense, conv1d, conv2d, conv, embedding), exclusions "
        "(-3, -lm_head); id:, name:, type: force a reading. Default: all layers.",
        show_default=False,
    ),
]
MinEvalsOption = Annotated[
    int,
    typer.Option(
        "--min-evals", min=1, metavar="N", help="Skip layers with fewer eigenvalues than this."
    ),
]
MaxEvalsOption = Annotated[
    int,
    typer.Option(
        "--max-evals",
        min=0,
        metavar="N",
        help="Skip layers with more eigenvalues than this (weightwatcher's default; 0 = no limit).",
    ),
]
FormatOption = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="What to print on stdout.")
]
TrustPickleOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow PyTorch files that hold pickled Python objects (a whole nn.Module). "
        "Loading such a file can run code from it: only for files you trust.",
    ),
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


@dataclass
class _Run:
    """Per-invocation state of the command: where people-facing text goes."""

    debug: bool
    quiet: bool
    stderr: Console
    had_input_error: bool = False

    def error(self, message: str) -> None:
        self.stderr.print(f"wwcli: error: {printable(message)}", markup=False, highlight=False)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(printable(message), markup=False, highlight=False)


def _stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout_style() -> tuple[int, bool]:
    """Width and color for tables on stdout: the terminal's, or wide and plain when piped."""
    probe = Console(file=sys.stdout)
    if probe.is_terminal:
        return probe.width, not probe.no_color and probe.color_system is not None
    columns = os.environ.get("COLUMNS", "")
    return (int(columns) if columns.isdigit() else 160), False


def _fail(run: _Run, message: str, error: BaseException | None = None) -> NoReturn:
    if run.debug and error is not None:
        run.stderr.print("".join(traceback.format_exception(error)), markup=False)
    run.error(message)
    raise typer.Exit(ExitCode.ERROR)


@contextmanager
def _guard(run: _Run) -> Iterator[None]:
    """Turn every failure into one line on stderr and exit code 2 (never 1 for a crash)."""
    from wwcli.loaders import LoaderError
    from wwcli.selection import SelectionError

    global death_signal
    try:
        yield
    except typer.Exit:
        raise
    except (LoaderError, SelectionError, UsageError) as error:
        _fail(run, str(error), error)
    except BrokenPipeError:
        # The reader of stdout went away (`wwcli analyze ... | head -1`): stop quietly, as git
        # and ruff do; nothing more may be written to that pipe.
        silence_stdout()
        death_signal = signal.SIGPIPE
        raise typer.Exit(128 + signal.SIGPIPE) from None
    except KeyboardInterrupt as error:
        signum = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
        run.error("terminated" if signum == signal.SIGTERM else "interrupted")
        death_signal = signum
        raise typer.Exit(128 + signum) from None
    except MemoryError as error:
        _fail(run, "not enough memory for this run (try fewer --jobs, or --max-evals)", error)
    except Exception as error:
        _fail(
            run,
            f"internal error: {type(error).__name__}: {error} (run with --debug for the "
            "traceback, and please report it)",
            error,
        )


def silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture stdout)
        pass


def _engine_options(
    min_evals: int, max_evals: int, device: Device, precision: Precision
) -> EngineOptions:
    from wwcli.engine import EngineOptions

    try:
        return EngineOptions(
            min_evals=min_evals,
            max_evals=max_evals or None,
            backend="torch" if device is Device.cuda else "numpy",
            device=device.value,
            precision=precision.value,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def _check_device(options: EngineOptions) -> None:
    """Fail before reading anything when the eigensolver cannot run where it was asked to."""
    from wwcli.engine import check_backend

    try:
        check_backend(backend=options.backend, device=options.device)
    except ValueError as error:
        raise UsageError(f"--device {options.device}: {error}") from error


def _write_atomically(target: Path, text: str) -> None:
    """Write `text` to `target` through a temporary file in the same folder and a rename, so a
    reader never sees half a file and a failure leaves the old file as it was.

    A target that exists and is not a regular file (/dev/null, /dev/stdout, a FIFO) is written
    in place: renaming over it would replace the device node or pipe. A symbolic link is
    followed, so the file it points to is replaced and the link stays."""
    target = target.expanduser()
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise UsageError(f"{target}: cannot write: {error.strerror or error}") from error
    if mode is not None and not stat.S_ISREG(mode):
        try:
            with target.open("w", encoding="utf-8", newline="") as stream:
                stream.write(text)
        except OSError as error:
            raise UsageError(f"{target}: cannot write: {error.strerror or error}") from error
        return
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UsageError(f"{target}: cannot write: {error.strerror or error}") from error
        raise


CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5", ".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _check_output_target(target: Path, inputs: Sequence[Path], option: str) -> None:
    """Refuse output paths that would overwrite an input or a checkpoint-looking file."""
    resolved = target.expanduser().resolve()
    for path in inputs:
        source = path.expanduser().resolve()
        if resolved == source:
            raise UsageError(f"{option} {target}: refusing to overwrite the input checkpoint")
    if resolved.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise UsageError(f"{option} {target}: refusing to write a report over a checkpoint name")
    if resolved.is_dir():
        raise UsageError(f"{option} {target}: is a folder")
    if not resolved.parent.is_dir():
        raise UsageError(f"{option} {target}: folder {resolved.parent} does not exist")


def _check_not_read(targets: Sequence[tuple[Path, str]], checkpoint: Checkpoint) -> None:
    """Refuse report paths that are one of the files this checkpoint reads (a folder's index or
    shard), before any of it is analyzed."""
    read = {Path(os.path.realpath(path)) for path in checkpoint.source_files()}
    for target, option in targets:
        if Path(os.path.realpath(target.expanduser())) in read:
            raise UsageError(
                f"{option} {target}: refusing to overwrite a file the checkpoint "
                f"{checkpoint.path} is read from"
            )


@contextmanager
def _progress(run: _Run, label: str, total: int) -> Iterator[Callable[[LayerSpec], None] | None]:
    """A transient progress bar on stderr when it is a terminal (layer name, n/N, elapsed);
    yields the callback that advances it, or None when there is no bar."""
    if run.quiet or not run.stderr.is_terminal or total == 0:
        yield None
        return
    progress = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=run.stderr,
        transient=True,
    )
    task = progress.add_task(printable(label), total=total)

    def advance(spec: LayerSpec) -> None:
        progress.update(task, advance=1, description=printable(spec.name))

    with progress:
        yield advance


@app.command()
def describe(
    paths: PathsArgument,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    output_format: FormatOption = OutputFormat.table,
    trust_pickle: TrustPickleOption = False,
    debug: DebugOption = False,
) -> None:
    """List the layers of checkpoints: id, name, type, shape, number of eigenvalues, and
    whether analyze would analyze them. Reads headers and shapes only, no weights.

    Examples:

      wwcli describe model.keras

      wwcli describe ./hf-model/ --format json
    """
    run = _Run(debug=debug, quiet=False, stderr=_stderr_console())
    with _guard(run):
        from wwcli.loaders import open_checkpoint
        from wwcli.report.csv import render_csv
        from wwcli.report.json import Listing, describe_document, render_json
        from wwcli.report.rows import DESCRIBE_COLUMNS, describe_row
        from wwcli.report.table import render_describe_table
        from wwcli.selection import parse_layers, select_layers

        options = _engine_options(min_evals, max_evals, Device.cpu, Precision.float64)
        terms = parse_layers(layers) if layers is not None else ()
        listings = []
        for path in paths:
            with open_checkpoint(path, trust_pickle=trust_pickle) as checkpoint:
                specs = checkpoint.layers()
                chosen = select_layers(specs, terms) if terms else specs
                rows = [describe_row(str(path), spec, options) for spec in chosen]
                listings.append(
                    Listing(
                        str(path),
                        checkpoint.format,
                        checkpoint.ids_note,
                        checkpoint.source_note,
                        rows,
                    )
                )
        if output_format is OutputFormat.json:
            sys.stdout.write(render_json(describe_document(listings)))
        elif output_format is OutputFormat.csv:
            all_rows = [row for listing in listings for row in listing.rows]
            sys.stdout.write(render_csv(all_rows, DESCRIBE_COLUMNS))
        else:
            width, color = _stdout_style()
            for listing in listings:
                sys.stdout.write(
                    render_describe_table(
                        listing.checkpoint,
                        (listing.source_note, listing.ids_note),
                        listing.rows,
                        width=width,
                        color=color,
                    )
                )


@app.command(epilog=EXIT_CODES_HELP)
def analyze(
    paths: PathsArgument,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    output_format: FormatOption = OutputFormat.table,
    csv_file: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            metavar="FILE",
            help="Also write the results as CSV to this file.",
            dir_okay=False,
        ),
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option(
            "--json",
            metavar="FILE",
            help="Also write the results as JSON to this file.",
            dir_okay=False,
        ),
    ] = None,
    fail_below: Annotated[
        float,
        typer.Option(
            "--fail-below",
            metavar="ALPHA",
            help="Gate: exit 1 when a layer's alpha is below this. A negative value turns the "
            "check off.",
        ),
    ] = 2.0,
    fail_above: Annotated[
        float | None,
        typer.Option(
            "--fail-above",
            metavar="ALPHA",
            help="Gate: exit 1 when a layer's alpha is above this (6 marks under-trained). "
            "Off by default.",
            show_default=False,
        ),
    ] = None,
    fail_on_failed_fit: Annotated[
        bool,
        typer.Option("--fail-on-failed-fit", help="Gate: exit 1 when a power-law fit failed."),
    ] = False,
    exit_zero: Annotated[
        bool, typer.Option("--exit-zero", help="Report, but always exit 0 unless an error.")
    ] = False,
    device: Annotated[
        Device,
        typer.Option("--device", help="Where to compute eigenvalues (cuda needs torch)."),
    ] = Device.cpu,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="Precision of the Gram matrix and eigensolver. float32 is an opt-in for GPUs; "
            "it loses the smallest eigenvalues and is not faster on CPU.",
        ),
    ] = Precision.float64,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            metavar="N",
            help="Layers analyzed in parallel, BLAS capped to one thread each "
            "(default: the number of cores); 1 = one layer at a time.",
            show_default=False,
        ),
    ] = None,
    trust_pickle: TrustPickleOption = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")
    ] = False,
    debug: DebugOption = False,
) -> None:
    """Compute alpha and the other spectral metrics of every weight matrix, show them, and
    exit 1 when a layer trips the gate (by default: alpha < 2, very heavy-tailed, possibly
    over-trained).

    Examples:

      wwcli analyze model.keras

      wwcli analyze model.pt --layers 1 --csv out.csv

      wwcli analyze ./hf-model/ --format json > report.json

      wwcli analyze run/ckpt-*.keras --fail-below 2 --fail-above 6
    """
    run = _Run(debug=debug, quiet=quiet, stderr=_stderr_console())
    with _guard(run):
        from wwcli.analysis import CheckpointReport, analyze_checkpoint, default_jobs
        from wwcli.loaders import LoaderError, open_checkpoint
        from wwcli.report.csv import render_csv
        from wwcli.report.json import analyze_document, render_json
        from wwcli.report.rows import ANALYZE_COLUMNS, analyze_rows
        from wwcli.report.table import render_analyze_table, summary_lines
        from wwcli.selection import parse_layers, select_layers

        try:
            policy = GatePolicy(
                fail_below=fail_below if fail_below >= 0 else None,
                fail_above=fail_above,
                fail_on_failed_fit=fail_on_failed_fit,
                exit_zero=exit_zero,
            )
        except ValueError as error:
            raise UsageError(str(error)) from error
        options = _engine_options(min_evals, max_evals, device, precision)
        _check_device(options)
        terms = parse_layers(layers) if layers is not None else ()
        targets = [
            (target, option)
            for target, option in ((csv_file, "--csv"), (json_file, "--json"))
            if target is not None
        ]
        for target, option in targets:
            _check_output_target(target, paths, option)

        reports: list[CheckpointReport] = []
        for path in paths:
            try:
                with open_checkpoint(path, trust_pickle=trust_pickle) as checkpoint:
                    _check_not_read(targets, checkpoint)
                    specs = checkpoint.layers()
                    chosen = select_layers(specs, terms) if terms else specs
                    with _progress(run, str(path), len(chosen)) as advance:
                        report = analyze_checkpoint(
                            checkpoint,
                            chosen,
                            label=str(path),
                            options=options,
                            jobs=jobs or default_jobs(),
                            on_layer=advance,
                        )
            except LoaderError as error:
                if len(paths) == 1:
                    raise
                run.error(str(error))
                run.had_input_error = True
                continue
            reports.append(report)
            if output_format is OutputFormat.table:
                width, color = _stdout_style()
                sys.stdout.write(render_analyze_table(report, width=width, color=color))
                sys.stdout.flush()
            else:
                for line in summary_lines(report):
                    run.info(line)

        option_values = {
            "layers": layers,
            "min_evals": min_evals,
            "max_evals": max_evals or None,
            "fail_below": policy.fail_below,
            "fail_above": policy.fail_above,
            "fail_on_failed_fit": fail_on_failed_fit,
            "device": device.value,
            "precision": precision.value,
        }
        rows = [row for report in reports for row in analyze_rows(report)]
        if output_format is OutputFormat.json:
            sys.stdout.write(render_json(analyze_document(reports, option_values)))
        elif output_format is OutputFormat.csv:
            sys.stdout.write(render_csv(rows, ANALYZE_COLUMNS))

        if run.had_input_error:
            run.error("some inputs could not be read; no report files were written")
            raise typer.Exit(ExitCode.ERROR)
        if csv_file is not None:
            _write_atomically(csv_file, render_csv(rows, ANALYZE_COLUMNS))
        if json_file is not None:
            _write_atomically(json_file, render_json(analyze_document(reports, option_values)))

        results = [result for report in reports for result in report.layers]
        code = exit_code(results, policy)
        for report in reports:
            for result in report.layers:
                reason = trip_reason(result, policy)
                if reason is not None and not policy.exit_zero:
                    run.stderr.print(
                        printable(
                            f"gate: {report.checkpoint}: layer {result.spec.layer_id} "
                            f"{result.spec.name}: {reason}"
                        ),
                        markup=False,
                        highlight=False,
                    )
        raise typer.Exit(code)
