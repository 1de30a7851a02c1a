"""The `wwcli` command line: commands only. Options become one RunSettings value
(`settings_from_cli`), the run layer (wwcli/analysis.py) turns paths into reports, the gate
decides once, and `emit` writes what the user asked for.

stdout carries data only (the table, CSV or JSON); progress, warnings, errors and the summary
of a csv/json run go to stderr. Every line for people escapes what comes from the file
(wwcli/report/escape.py).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import signal
import stat
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from wwcli import __version__
from wwcli.exit_codes import ExitCode
from wwcli.report.escape import printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from wwcli.gate import Baseline, GateOutcome, GatePolicy
    from wwcli.loaders import LayerSpec
    from wwcli.report.interface import Formatter
    from wwcli.results import CheckpointReport, RunResult
    from wwcli.runners import Runner
    from wwcli.settings import RunSettings

EXIT_CODES_HELP = (
    "Exit codes: 0 no layer tripped the gate; 1 the gate tripped (a layer with alpha below "
    "--fail-below, above --fail-above, a failed fit with --fail-on-failed-fit, or metrics that "
    "satisfy a --fail-on rule); 2 usage "
    "error, or an input that is missing, unreadable, unsupported or unsafe."
)


CONFIG_FILES = ("wwcli.toml", "pyproject.toml")
"""Where project settings live, in the order looked for in each folder from the current one up:
a wwcli.toml (its top level, or its [tool.wwcli] table), or a pyproject.toml's [tool.wwcli]."""


def _config_table(path: Path) -> dict[str, object] | None:
    """The settings table of a config file, or None when it has none."""
    import tomllib

    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise typer.BadParameter(f"{path}: cannot read it as TOML: {error}") from error
    table = (
        document.get("tool", {}).get("wwcli") if isinstance(document.get("tool"), dict) else None
    )
    if table is None and path.name != "pyproject.toml":
        table = document
    return table if isinstance(table, dict) else None


def find_config(start: Path) -> tuple[Path, dict[str, object]] | None:
    """The nearest config file with wwcli settings, from `start` up to the root."""
    for folder in (start, *start.parents):
        for name in CONFIG_FILES:
            candidate = folder / name
            if candidate.is_file():
                table = _config_table(candidate)
                if table is not None:
                    return candidate, table
    return None


def _config_source(args: Sequence[str]) -> tuple[Path, dict[str, object]] | None:
    """The config a command line asks for: --isolated none, --config FILE that file, otherwise
    the nearest one (read before the options are parsed: its values become their defaults)."""
    arguments = list(args)[: list(args).index("--")] if "--" in args else list(args)
    if "--isolated" in arguments:
        return None
    for index, argument in enumerate(arguments):
        if argument.startswith("--config="):
            path = Path(argument.split("=", 1)[1])
        elif argument == "--config" and index + 1 < len(arguments):
            path = Path(arguments[index + 1])
        else:
            continue
        if not path.is_file():
            raise typer.BadParameter(f"--config {path}: no such file")
        return path, _config_table(path) or {}
    return find_config(Path.cwd())


class _Command(typer.core.TyperCommand):
    """A command whose --help groups its options in panels (input, selection, engine, gate,
    output) and names no Python types: an argument shows its metavar alone, not Typer's
    <list[Path]>. Plain text, so that --help needs neither rich's help renderer nor markdown
    (a third of the start-up time).

    Its options' defaults come from the project's config ([tool.wwcli] in the nearest
    pyproject.toml, or wwcli.toml) through Click's default_map: flags on the command line win;
    --config FILE and --isolated choose another file or none, as in ruff."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any
    ) -> Any:
        found = _config_source(args)
        if found is not None:
            path, table = found
            names = {param.name for param in self.params if param.name}
            group = getattr(parent, "command", None)
            everywhere = set(names)
            for command in getattr(group, "commands", {}).values():
                everywhere |= {param.name for param in command.params if param.name}
            defaults: dict[str, object] = {}
            for key, value in table.items():
                name = key.replace("-", "_")
                if name in names and name not in ("paths", "config", "isolated"):
                    defaults[name] = value
                elif name not in everywhere:
                    raise typer.BadParameter(
                        f"{path}: unknown setting {key!r} (settings are option names, such as "
                        "fail-below or gate-min-evals)"
                    )
            extra.setdefault("default_map", defaults)
        return super().make_context(info_name, args, parent=parent, **extra)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, typer.core.TyperArgument):
                record = (param.metavar or param.name or "", record[1])
                panel = "Arguments"
            else:
                panel = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(panel, []).append(record)
        for panel, records in sections.items():
            with formatter.section(panel):
                formatter.write_dl(records)


app = typer.Typer(
    name="wwcli",
    help=(
        "Heavy-tailed spectral diagnostics for saved neural-network checkpoints: the power-law "
        "exponent alpha of every weight matrix's eigenvalue spectrum, as weightwatcher 0.7.7 "
        "computes it, and optional diagnostics beyond it (MP bulk, randomized spectra, the "
        "update against a base checkpoint). alpha < 2 marks a very heavy-tailed layer: a "
        "description of its spectrum, not evidence of over-training by itself.\n\n"
        + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

INPUT, SELECTION, ENGINE, GATE, OUTPUT = "Input", "Selection", "Engine", "Gate", "Output"
"""The --help panels options are grouped in."""
DIAGNOSTICS = "Diagnostics"
"""The --help panel of the optional diagnostics beyond alpha (wwcli/diagnostics.py)."""


class OutputFormat(enum.StrEnum):
    """What stdout carries."""

    table = "table"
    csv = "csv"
    json = "json"
    github = "github"
    junit = "junit"
    markdown = "markdown"
    sarif = "sarif"


class Device(enum.StrEnum):
    """Where eigenvalues are computed."""

    cpu = "cpu"
    cuda = "cuda"


class Conv1DMode(enum.StrEnum):
    """How Conv1D kernels become spectra."""

    pooled = "pooled"
    weightwatcher = "weightwatcher"


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


def _file_option(flag: str, help: str, *, panel: str, metavar: str = "FILE") -> Any:
    """An option naming a file to read or write (no default shown, never a folder)."""
    return typer.Option(
        flag, metavar=metavar, help=help, show_default=False, dir_okay=False, rich_help_panel=panel
    )


# --- Options shared by the commands ----------------------------------------------------------

PathsArgument = Annotated[
    list[Path],
    typer.Argument(
        help="Checkpoint files (.keras .h5 .weights.h5 .pt .pth .bin .ckpt .safetensors) or "
        "model folders (sharded safetensors with an index, Hugging Face folders).",
        show_default=False,
        metavar="PATH",
    ),
]
TrustPickleOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow PyTorch files that hold pickled Python objects (a whole nn.Module). "
        "Loading such a file can run code from it: only for files you trust.",
        rich_help_panel=INPUT,
    ),
]
ConfigOption = Annotated[
    Path | None,
    _file_option(
        "--config",
        "Read option defaults from this TOML file (its [tool.wwcli] table, or its top "
        "level) instead of the nearest pyproject.toml [tool.wwcli] or wwcli.toml. Flags win.",
        panel=INPUT,
    ),
]
IsolatedOption = Annotated[
    bool,
    typer.Option("--isolated", help="Ignore every config file.", rich_help_panel=INPUT),
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
        rich_help_panel=SELECTION,
    ),
]
MinEvalsOption = Annotated[
    int,
    typer.Option(
        "--min-evals",
        min=1,
        metavar="N",
        help="Skip layers with fewer eigenvalues than this.",
        rich_help_panel=SELECTION,
    ),
]
MaxEvalsOption = Annotated[
    int,
    typer.Option(
        "--max-evals",
        min=0,
        metavar="N",
        help="Skip layers with more eigenvalues than this (weightwatcher's default; 0 = no limit).",
        rich_help_panel=SELECTION,
    ),
]
FormatOption = Annotated[
    OutputFormat,
    typer.Option("--format", "-f", help="What to print on stdout.", rich_help_panel=OUTPUT),
]
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks on errors.", rich_help_panel=OUTPUT)
]
JobsOption = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        min=1,
        metavar="N",
        help="Layers analyzed (and pictures drawn) in parallel, BLAS capped to one thread each "
        "(default: the number of cores); 1 = one layer at a time.",
        show_default=False,
        rich_help_panel=ENGINE,
    ),
]
EXECUTION = "Execution"
"""The --help panel of where the work runs: processes, a Dask cluster, the result cache."""
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=1,
        metavar="W",
        help="Checkpoints analyzed at once, each in a process of its own with --jobs layer "
        "threads; W x jobs never exceeds the cores (default: analyze 1, sweep one per "
        "checkpoint up to the cores). The output is the same bytes for any W and jobs.",
        show_default=False,
        rich_help_panel=EXECUTION,
    ),
]
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        envvar="DASK_SCHEDULER_ADDRESS",
        help="Run one task per checkpoint on this Dask cluster (its workers read the files at "
        "the paths as given: shared storage); needs wwcli[dask].",
        show_default=False,
        rich_help_panel=EXECUTION,
    ),
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        metavar="DIR",
        help="Keep results in this folder and read back those of checkpoints analyzed before "
        "under the same settings (wwcli's own JSON; keyed by size, mtime, a hash of the "
        "file's head and tail, the settings and the wwcli version).",
        show_default=False,
        file_okay=False,
        rich_help_panel=EXECUTION,
    ),
]
Conv1DOption = Annotated[
    Conv1DMode,
    typer.Option(
        "--conv1d",
        help="How Conv1D kernels are read: pooled (the k kernel positions pooled, M*k "
        "eigenvalues) or weightwatcher (0.7.7's numbers: only the min(k, in, out) largest "
        "eigenvalues; a kernel under 8 is skipped).",
        rich_help_panel=ENGINE,
    ),
]
QuietOption = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or summary on stderr.", rich_help_panel=OUTPUT),
]


class ImageFormat(enum.StrEnum):
    """The file format of --plot pictures."""

    png = "png"
    svg = "svg"


PlotOption = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        metavar="DIR",
        help="Also draw every analyzed layer's ESD (log-log and linear histograms, the fitted "
        "power law, xmin) and each checkpoint's overview into this folder (needs "
        "wwcli[plot]).",
        show_default=False,
        file_okay=False,
        rich_help_panel=OUTPUT,
    ),
]
PlotFormatOption = Annotated[
    ImageFormat,
    typer.Option(
        "--plot-format", help="File format of the --plot pictures.", rich_help_panel=OUTPUT
    ),
]
HtmlOption = Annotated[
    Path | None,
    _file_option(
        "--html",
        "Also write one self-contained HTML report (summary, table, every picture; opens "
        "with no network; needs wwcli[plot]).",
        panel=OUTPUT,
    ),
]
SpectraOption = Annotated[
    Path | None,
    _file_option(
        "--spectra",
        "Also write the eigenvalues of every analyzed layer, keyed by layer name, as a "
        "NumPy .npz archive (np.load(FILE)[name]).",
        panel=OUTPUT,
        metavar="FILE.npz",
    ),
]


# --- Diagnostics beyond alpha (wwcli/diagnostics.py); all off by default ---------------------


class FixFingers(enum.StrEnum):
    """weightwatcher's fix_fingers."""

    none = "none"
    clip_xmax = "clip_xmax"


class FitKind(enum.StrEnum):
    """The law fitted to the tail."""

    power_law = "power_law"
    tpl = "tpl"


MpFitOption = Annotated[
    bool,
    typer.Option(
        "--mp-fit",
        help="Fit the Marchenko-Pastur bulk (weightwatcher's mp_fit=True): num_spikes, "
        "sigma_mp, bulk_max, bulk_min, mp_softrank, W_scale.",
        rich_help_panel=DIAGNOSTICS,
    ),
]
RandomizeOption = Annotated[
    bool,
    typer.Option(
        "--randomize",
        help="Permute each layer's elements and compare the spectra (weightwatcher's "
        "randomize=True): rand_distance, num_traps (correlation traps), ww_softrank, ...",
        rich_help_panel=DIAGNOSTICS,
    ),
]
SeedOption = Annotated[
    int,
    typer.Option(
        "--seed",
        min=0,
        metavar="N",
        help="Seed of --randomize's permutations (each layer's from the seed and its name: "
        "the same numbers whatever --jobs or --layers).",
        rich_help_panel=DIAGNOSTICS,
    ),
]
FixFingersOption = Annotated[
    FixFingers,
    typer.Option(
        "--fix-fingers",
        help="clip_xmax: weightwatcher's fix_fingers='clip_xmax' (refit with outlying top "
        "eigenvalues clipped; alpha becomes that fit's, raw_alpha and num_fingers beside).",
        rich_help_panel=DIAGNOSTICS,
    ),
]
FitOption = Annotated[
    FitKind,
    typer.Option(
        "--fit",
        help="tpl: fit a truncated power law (weightwatcher's fit='TPL', through the powerlaw "
        "package); alpha becomes its exponent, Lambda its cutoff. Slow: up to minutes a layer.",
        rich_help_panel=DIAGNOSTICS,
    ),
]
TailTestsOption = Annotated[
    bool,
    typer.Option(
        "--tail-tests",
        help="Likelihood-ratio tests of the fitted tail, power law vs lognormal and vs "
        "exponential (R, p; powerlaw package): is a power law a credible description at all?",
        rich_help_panel=DIAGNOSTICS,
    ),
]
DetxOption = Annotated[
    bool,
    typer.Option(
        "--detx",
        help="ERG / detX (weightwatcher's detX=True): detX_num, detX_val, ERG_gap.",
        rich_help_panel=DIAGNOSTICS,
    ),
]
BaseOption = Annotated[
    Path | None,
    typer.Option(
        "--base",
        metavar="CKPT",
        help="A base checkpoint (the initial weights, or the model before a fine-tune): the "
        "update W - W_base of every layer matched by name and shape is analyzed too "
        "(delta_alpha, delta_num_pl_spikes, delta_norm, ...; with --mp-fit delta_num_spikes).",
        show_default=False,
        rich_help_panel=DIAGNOSTICS,
    ),
]
AllDiagnosticsOption = Annotated[
    bool,
    typer.Option(
        "--all-diagnostics",
        help="Every diagnostic that is not slow and leaves alpha as it is: --mp-fit "
        "--randomize --detx --tail-tests (not --fit tpl, not --fix-fingers, not --base).",
        rich_help_panel=DIAGNOSTICS,
    ),
]
FailOnOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-on",
        metavar="EXPR",
        help="Exit 1 when a gated layer's metrics satisfy EXPR: comparisons of row keys "
        "(alpha, D, num_spikes, num_traps, delta_alpha, ...) with numbers, and/or/not, "
        "parentheses: 'alpha < 2 and num_spikes > 10'. Repeatable (any trips). Replaces the "
        "default --fail-below 2 unless --fail-below is given.",
        show_default=False,
        rich_help_panel=GATE,
    ),
]


@dataclass(frozen=True)
class DiagnosticChoices:
    """The Diagnostics panel's options as given."""

    mp_fit: bool = False
    randomize: bool = False
    seed: int = 0
    fix_fingers: FixFingers = FixFingers.none
    fit: FitKind = FitKind.power_law
    tail_tests: bool = False
    detx: bool = False
    base: Path | None = None
    all_diagnostics: bool = False


# --- People-facing text, errors and signals ----------------------------------------------------


@dataclass
class _Run:
    """Per-invocation state of the command: where people-facing text goes."""

    debug: bool
    quiet: bool
    _stderr: Console | None = field(default=None, init=False)

    @property
    def stderr(self) -> Console:
        """The console on stderr (rich is imported on first use: --help does not need it)."""
        if self._stderr is None:
            from rich.console import Console

            self._stderr = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._stderr

    def error(self, message: str) -> None:
        self.stderr.print(f"wwcli: error: {printable(message)}", markup=False, highlight=False)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(printable(message), markup=False, highlight=False)


def _stdout_style() -> tuple[int, bool]:
    """Width and color for tables on stdout: the terminal's; when piped, the width the user
    asked for with COLUMNS, or none at all (names are never folded in a file), and no color."""
    from rich.console import Console

    probe = Console(file=sys.stdout)
    if probe.is_terminal:
        return probe.width, not probe.no_color and probe.color_system is not None
    columns = os.environ.get("COLUMNS", "")
    return (int(columns) if columns.isdigit() and int(columns) > 0 else 100_000), False


def _fail(run: _Run, message: str, error: BaseException | str | None = None) -> NoReturn:
    _show_traceback(run, error)
    run.error(message)
    raise typer.Exit(ExitCode.ERROR)


def _show_traceback(run: _Run, error: BaseException | str | None) -> None:
    """With --debug, the traceback of an error (or its formatted text from another process)."""
    if not run.debug or not error:
        return
    text = error if isinstance(error, str) else "".join(traceback.format_exception(error))
    run.stderr.print(text, markup=False, highlight=False)


@contextmanager
def _guard(run: _Run) -> Iterator[None]:
    """Turn every failure into one line on stderr and exit code 2 (never 1 for a crash)."""
    global death_signal
    from wwcli.loaders import LoaderError
    from wwcli.selection import SelectionError

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


class _ProgressBar:
    """A transient progress bar on stderr (layer name, n/N, elapsed), one per checkpoint: the
    run layer's ProgressListener."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def checkpoint_started(self, label: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        if total == 0:
            return
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
        )
        self._task = self._progress.add_task(printable(label), total=total)
        self._progress.start()

    def layer_done(self, spec: LayerSpec) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=1, description=printable(spec.name))

    def checkpoint_done(self, label: str) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._task = None


# --- Settings from the options ---------------------------------------------------------------


def settings_from_cli(
    *,
    layers: str | None,
    min_evals: int,
    max_evals: int,
    trust_pickle: bool,
    device: Device = Device.cpu,
    precision: Precision = Precision.float64,
    conv1d: Conv1DMode = Conv1DMode.pooled,
    fail_below: float = 2.0,
    fail_above: float | None = None,
    fail_on_failed_fit: bool = False,
    exit_zero: bool = False,
    keep_spectra: bool = False,
    gate: GatePolicy | None = None,
    diagnostics: DiagnosticChoices | None = None,
) -> RunSettings:
    """The command line's options as one RunSettings (`gate`, when given, replaces the four
    simple gate options); UsageError for values that do not fit together (the message names
    the options)."""
    from wwcli.diagnostics import Diagnostics
    from wwcli.engine.options import EngineOptions
    from wwcli.gate import GatePolicy
    from wwcli.settings import RunSettings

    chosen = diagnostics or DiagnosticChoices()
    every = chosen.all_diagnostics
    engine_extras: dict[str, Any] = {}
    if chosen.fix_fingers is not FixFingers.none:
        engine_extras["fix_fingers"] = chosen.fix_fingers.value
    if chosen.fit is not FitKind.power_law:
        engine_extras["fit"] = chosen.fit.value
    if chosen.tail_tests or (every and _powerlaw_installed()):
        engine_extras["tail_tests"] = True
    try:
        engine = EngineOptions(
            min_evals=min_evals,
            max_evals=max_evals or None,
            backend="torch" if device is Device.cuda else "numpy",
            device=device.value,
            precision=precision.value,
            conv1d=conv1d.value,
            **engine_extras,
        )
    except ValueError as error:
        raise UsageError(_option_words(str(error))) from error
    if engine.tail_tests or engine.fit == "tpl":
        from wwcli.engine.tpl import import_powerlaw

        try:
            import_powerlaw()  # before any file is read: its install hint, exit 2
        except ValueError as error:
            option = "--fit tpl" if engine.fit == "tpl" else "--tail-tests"
            raise UsageError(f"{option}: {error}") from error
    if gate is None:
        try:
            gate = GatePolicy(
                fail_below=fail_below if fail_below >= 0 else None,
                fail_above=fail_above,
                fail_on_failed_fit=fail_on_failed_fit,
                exit_zero=exit_zero,
            )
        except ValueError as error:
            raise UsageError(_option_words(str(error))) from error
    try:
        return RunSettings(
            engine=engine,
            layers=layers,
            trust_pickle=trust_pickle,
            gate=gate,
            keep_spectra=keep_spectra,
            diagnostics=Diagnostics(
                mp_fit=chosen.mp_fit or every,
                randomize=chosen.randomize or every,
                seed=chosen.seed,
                detx=chosen.detx or every,
                base=str(chosen.base) if chosen.base is not None else None,
            ),
        )
    except ValueError as error:
        raise UsageError(_option_words(str(error))) from error


def _powerlaw_installed() -> bool:
    """Whether the powerlaw package can be imported (looked up, not imported)."""
    import importlib.util

    if "powerlaw" in sys.modules:
        return sys.modules["powerlaw"] is not None  # None: blocked
    return importlib.util.find_spec("powerlaw") is not None


def _say_left_out(run: _Run, settings: RunSettings, all_diagnostics: bool) -> None:
    """--all-diagnostics without powerlaw: say that the tail tests were left out."""
    if all_diagnostics and not settings.engine.tail_tests:
        run.info(
            "note: --all-diagnostics: no tail tests (they need the powerlaw package: "
            "pip install 'wwcli[tpl]')"
        )


def _option_words(message: str) -> str:
    """An engine or gate message with field names replaced by the options that set them."""
    for name in (
        "gate_min_evals",
        "min_evals",
        "max_evals",
        "fail_below",
        "fail_above",
        "max_over_trained",
        "max_drop",
    ):
        message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
    return message


def parse_fail_below(text: str) -> tuple[float | None, tuple[tuple[str, float], ...]]:
    """--fail-below's value: "2", or per-type lines "dense=2,conv2d=1.8" (with an optional plain
    number for every other type: "2,conv2d=1.8"). A negative line turns that check off."""
    from wwcli.gate import GATED_TYPES

    default: float | None = 2.0
    by_type: list[tuple[str, float]] = []
    for token in (part.strip() for part in text.split(",")):
        kind, _, value = token.rpartition("=")
        try:
            line = float(value)
        except ValueError:
            raise UsageError(f"--fail-below {text}: {value!r} is not a number") from None
        if not math.isfinite(line):
            raise UsageError(f"--fail-below {text}: {value} is not a finite number")
        if not kind:
            default = line if line >= 0 else None
            continue
        known = sorted(GATED_TYPES | {"embedding"})
        if kind.strip() not in known:
            raise UsageError(
                f"--fail-below {text}: unknown layer type {kind!r} (one of {', '.join(known)})"
            )
        if line >= 0:
            by_type.append((kind.strip(), line))
    return default, tuple(by_type)


def _load_baseline(path: Path) -> Baseline:
    """A previous wwcli JSON report as a Baseline (alpha per layer name, per checkpoint)."""
    import json

    from wwcli.gate import Baseline

    try:
        document = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"--baseline {path}: cannot read it as JSON: {error}") from error
    objects = document.get("checkpoints", [document]) if isinstance(document, dict) else None
    alphas: dict[str, dict[str, float | None]] = {}
    for item in objects or []:
        layers = item.get("layers") if isinstance(item, dict) else None
        if not isinstance(layers, list) or not isinstance(item.get("checkpoint"), str):
            objects = None
            break
        table = alphas.setdefault(item["checkpoint"], {})
        for layer in layers:
            if isinstance(layer, dict) and isinstance(layer.get("name"), str):
                alpha = layer.get("alpha")
                table[layer["name"]] = float(alpha) if isinstance(alpha, int | float) else None
    if not objects:
        raise UsageError(f"--baseline {path}: not a wwcli analyze JSON report (--json FILE)")
    return Baseline(str(path), alphas)


def gate_from_cli(
    *,
    fail_below: str = "2",
    fail_above: float | None = None,
    fail_on_failed_fit: bool = False,
    exit_zero: bool = False,
    gate_min_evals: int | None = None,
    gate_ignore: Sequence[str] = (),
    max_over_trained: int = 0,
    allow_empty: bool = False,
    baseline: Path | None = None,
    max_drop: float | None = None,
    fail_on: Sequence[str] = (),
    fail_below_given: bool = True,
) -> GatePolicy:
    """The gate options as one GatePolicy; UsageError naming the option for bad values.
    --fail-on rules replace the default alpha line unless --fail-below was given
    (`fail_below_given`: on the command line or in the config)."""
    from wwcli.gate import GATE_MIN_EVALS, GatePolicy, parse_fail_on

    line, by_type = parse_fail_below(fail_below)
    for text in fail_on:
        try:
            parse_fail_on(text)
        except ValueError as error:
            raise UsageError(f"--fail-on {text!r}: {error}") from error
    if fail_on and not fail_below_given:
        line, by_type = None, ()
    for option, value in (("--fail-above", fail_above), ("--max-drop", max_drop)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{option} {value}: not a finite number")
    if max_drop is not None and baseline is None:
        raise UsageError("--max-drop needs --baseline FILE")
    try:
        return GatePolicy(
            fail_below=line,
            fail_above=fail_above,
            fail_on_failed_fit=fail_on_failed_fit,
            exit_zero=exit_zero,
            fail_below_by_type=by_type,
            gate_min_evals=GATE_MIN_EVALS if gate_min_evals is None else gate_min_evals,
            gate_ignore=tuple(gate_ignore),
            max_over_trained=max_over_trained,
            allow_empty=allow_empty,
            baseline=_load_baseline(baseline) if baseline is not None else None,
            max_drop=max_drop,
            fail_on=tuple(fail_on),
        )
    except ValueError as error:
        raise UsageError(_option_words(str(error))) from error


def _check_device(settings: RunSettings) -> None:
    """Fail before reading anything when the eigensolver cannot run where it was asked to."""
    from wwcli.engine import check_backend

    try:
        check_backend(backend=settings.engine.backend, device=settings.engine.device)
    except ValueError as error:
        raise UsageError(f"--device {settings.engine.device}: {error}") from error


# --- Report files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFile:
    """A report the user asked to be written to a file."""

    path: Path
    """Where."""
    option: str
    """The option that asked for it ("--csv"), for messages."""
    file_format: str
    """What goes in it: "csv", "json", "html" (the report with its pictures) or "npz" (spectra)."""


CHECKPOINT_SUFFIXES = (".keras", ".h5", ".hdf5", ".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _check_output_target(target: ReportFile, inputs: Sequence[Path]) -> None:
    """Refuse output paths that would overwrite an input or a checkpoint-looking file."""
    resolved = target.path.expanduser().resolve()
    for path in inputs:
        if resolved == path.expanduser().resolve():
            raise UsageError(
                f"{target.option} {target.path}: refusing to overwrite the input checkpoint"
            )
    if resolved.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise UsageError(
            f"{target.option} {target.path}: refusing to write a report over a checkpoint name"
        )
    if resolved.is_dir():
        raise UsageError(f"{target.option} {target.path}: is a folder")
    if not resolved.parent.is_dir():
        raise UsageError(f"{target.option} {target.path}: folder {resolved.parent} does not exist")


def _check_not_read(targets: Sequence[ReportFile], report: CheckpointReport) -> None:
    """Refuse report paths that are one of the files a checkpoint was read from (a folder's
    index or shard)."""
    read = set(report.source_files)
    for target in targets:
        if os.path.realpath(target.path.expanduser()) in read:
            raise UsageError(
                f"{target.option} {target.path}: refusing to overwrite a file the checkpoint "
                f"{report.checkpoint} is read from"
            )


def _write_atomically(target: Path, text: str | bytes) -> None:
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
            _write_to(target, text)
        except OSError as error:
            raise UsageError(f"{target}: cannot write: {error.strerror or error}") from error
        return
    if target.is_symlink():
        target = Path(os.path.realpath(target))
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _write_to(temporary, text)
        os.replace(temporary, target)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UsageError(f"{target}: cannot write: {error.strerror or error}") from error
        raise


def _write_to(path: Path, data: str | bytes) -> None:
    if isinstance(data, bytes):
        with path.open("wb") as stream:
            stream.write(data)
    else:
        with path.open("w", encoding="utf-8", newline="") as stream:
            stream.write(data)


@dataclass(frozen=True)
class Pictures:
    """What the run draws after the numbers: ESD plots and overviews into a folder."""

    folder: Path | None
    """--plot DIR; None: no picture files."""
    image_format: str = "png"
    """--plot-format."""
    jobs: int = 1
    """Threads the pictures are drawn in."""

    @property
    def wanted(self) -> bool:
        """Whether a picture is asked for."""
        return self.folder is not None


def _check_pictures(pictures: Pictures, targets: Sequence[ReportFile]) -> None:
    """Fail before anything is read when pictures are asked for and cannot be drawn."""
    if pictures.folder is not None and pictures.folder.exists() and not pictures.folder.is_dir():
        raise UsageError(f"--plot {pictures.folder}: exists and is not a folder")
    if pictures.wanted or any(target.file_format == "html" for target in targets):
        from wwcli.report.plots import PlotError, require_matplotlib

        try:
            require_matplotlib()
        except PlotError as error:
            raise UsageError(str(error)) from error


def _picture_progress(run: _Run, label: str, total: int) -> _ProgressBar | None:
    if run.quiet or not run.stderr.is_terminal:
        return None
    bar = _ProgressBar(run.stderr)
    bar.checkpoint_started(label, total)
    return bar


def _file_content(run: _Run, result: RunResult, target: ReportFile, jobs: int) -> str | bytes:
    """What a report file holds."""
    if target.file_format == "npz":
        from wwcli.report.spectra import spectra_npz

        return spectra_npz(result)
    if target.file_format == "html":
        from wwcli.report.figures import report_images
        from wwcli.report.html import render_html

        total = sum(len(report.layers) for report in result.reports)
        bar = _picture_progress(run, "plots for the report", total)
        try:
            images = report_images(
                result, jobs=jobs, on_layer=(lambda r: bar.layer_done(r.spec)) if bar else None
            )
        finally:
            if bar is not None:
                bar.checkpoint_done("")
        return render_html(result, images)
    return _formatter(OutputFormat(target.file_format)).render(result)


def _write_pictures(run: _Run, result: RunResult, pictures: Pictures) -> None:
    if pictures.folder is None:
        return
    from wwcli.report.figures import write_plots

    total = sum(len(report.layers) for report in result.reports)
    bar = _picture_progress(run, "plots", total)
    try:
        written = write_plots(
            result,
            pictures.folder.expanduser(),
            image_format=pictures.image_format,
            jobs=pictures.jobs,
            on_layer=(lambda r: bar.layer_done(r.spec)) if bar else None,
        )
    except OSError as error:
        raise UsageError(
            f"--plot {pictures.folder}: cannot write: {error.strerror or error}"
        ) from error
    finally:
        if bar is not None:
            bar.checkpoint_done("")
    run.info(f"{len(written)} pictures written to {pictures.folder}")


# --- Running and emitting ----------------------------------------------------------------------


def _formatter(output_format: OutputFormat) -> Formatter:
    from wwcli.report.interface import formatter_for

    width, color = _stdout_style()
    return formatter_for(output_format.value, width=width, color=color)


def _run_analysis(
    run: _Run,
    paths: Sequence[Path],
    settings: RunSettings,
    *,
    jobs: int | None,
    stdout_format: Formatter | None,
    targets: Sequence[ReportFile],
    runner: Runner | None = None,
) -> RunResult:
    """Analyze every path through the run layer (with `runner`, or in this process in `jobs`
    threads), streaming what can be shown as each report arrives (a table, or the summary on
    stderr; an unreadable input's error line)."""
    from wwcli.analysis import analyze_paths
    from wwcli.report.table import summary_lines
    from wwcli.results import InputFailure, RunResult
    from wwcli.runners import LocalRunner, default_jobs

    progress = None if run.quiet or not run.stderr.is_terminal else _ProgressBar(run.stderr)
    runner = runner or LocalRunner(jobs=jobs or default_jobs())
    reports = []
    failures = []
    for outcome in analyze_paths(paths, settings, runner=runner, progress=progress):
        if isinstance(outcome, InputFailure):
            _show_traceback(run, outcome.traceback)
            run.error(outcome.message)
            failures.append(outcome)
            continue
        _check_not_read(targets, outcome)
        reports.append(outcome)
        if stdout_format is not None and stdout_format.streams:
            sys.stdout.write(stdout_format.render_report(outcome))
            sys.stdout.flush()
        else:
            for line in summary_lines(outcome):
                run.info(line)
    return RunResult(settings, tuple(reports), tuple(failures))


def emit(
    run: _Run,
    result: RunResult,
    stdout_format: Formatter | None,
    targets: Sequence[ReportFile],
    pictures: Pictures | None = None,
    *,
    explain_gate: bool = False,
) -> ExitCode:
    """Write what the run asked for: the rest of stdout, the report files and pictures (only
    when every input was read; pictures after the numbers, which they never change), the gate's
    trips; return the exit code the gate decided."""
    from wwcli.gate import evaluate

    if result.reports and stdout_format is not None and not stdout_format.streams:
        sys.stdout.write(stdout_format.render(result))
    outcome = evaluate(result)
    if result.failures:
        if len(result.failures) + len(result.reports) > 1:
            run.error("some inputs could not be read; no report files were written")
        return outcome.code
    jobs = pictures.jobs if pictures is not None else 1
    for target in targets:
        _write_atomically(target.path, _file_content(run, result, target, jobs))
    if pictures is not None:
        _write_pictures(run, result, pictures)
    _say_gate(run, outcome, explain=explain_gate)
    if outcome.empty and outcome.code is ExitCode.ERROR:
        run.error(
            f"the gate judged no layer: {outcome.empty}; it would pass by accident "
            "(see --explain-gate; --gate-min-evals, --layers, or --allow-empty)"
        )
    return outcome.code


def _say_gate(run: _Run, outcome: GateOutcome, *, explain: bool) -> None:
    """The gate's lines on stderr: its trips always; why layers were not gated (grouped), its
    notes, and with --explain-gate the rule applied to every layer."""
    for rule in outcome.rules:
        run.info(f"gate: rule: {rule}")
    for trip in outcome.trips:
        run.stderr.print(
            printable(f"gate: {trip.checkpoint}: layer {trip.layer_id} {trip.name}: {trip.reason}"),
            markup=False,
            highlight=False,
        )
    for note in outcome.notes:
        run.info(f"note: {note}")
    if explain:
        for judgement in outcome.judged:
            what = (
                f"gated by {judgement.policy}"
                + (f": tripped, {judgement.reason}" if judgement.tripped else ": passed")
                if judgement.gated
                else f"not gated: {judgement.why_not}"
            )
            run.stderr.print(
                printable(
                    f"gate: {judgement.checkpoint}: layer {judgement.layer_id} "
                    f"{judgement.name}: {what}"
                ),
                markup=False,
                highlight=False,
            )
        return
    by_checkpoint: dict[str, list[str]] = {}
    for judgement in outcome.judged:
        if not judgement.gated:
            by_checkpoint.setdefault(judgement.checkpoint, []).append(
                f"{judgement.layer_id} {judgement.name} ({judgement.why_not})"
            )
    for checkpoint, layers in by_checkpoint.items():
        shown = ", ".join(layers[:6]) + (f", ... (+{len(layers) - 6})" if len(layers) > 6 else "")
        run.info(f"note: {checkpoint}: not gated: {shown}")


# --- Commands ----------------------------------------------------------------------------------


@app.command(cls=_Command)
def describe(
    paths: PathsArgument,
    trust_pickle: TrustPickleOption = False,
    config: ConfigOption = None,
    isolated: IsolatedOption = False,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    conv1d: Conv1DOption = Conv1DMode.pooled,
    output_format: FormatOption = OutputFormat.table,
    debug: DebugOption = False,
) -> None:
    """List the layers of checkpoints: id, name, type, shape, number of eigenvalues, and
    whether analyze would analyze them. Reads headers and shapes only, no weights.

    Examples:

      wwcli describe model.keras

      wwcli describe ./hf-model/ --format json

      wwcli describe model.safetensors --layers dense --format csv
    """
    run = _Run(debug=debug, quiet=False)
    with _guard(run):
        from wwcli.analysis import list_paths
        from wwcli.results import InputFailure

        settings = settings_from_cli(
            layers=layers,
            min_evals=min_evals,
            max_evals=max_evals,
            trust_pickle=trust_pickle,
            conv1d=conv1d,
        )
        listings = []
        for outcome in list_paths(paths, settings):
            if isinstance(outcome, InputFailure):
                _fail(run, outcome.message, outcome.traceback)  # stops at the first one
            listings.append(outcome)
        sys.stdout.write(_formatter(output_format).render_listings(listings))


@app.command(cls=_Command, epilog=EXIT_CODES_HELP)
def analyze(
    ctx: typer.Context,
    paths: PathsArgument,
    trust_pickle: TrustPickleOption = False,
    config: ConfigOption = None,
    isolated: IsolatedOption = False,
    layers: LayersOption = None,
    min_evals: MinEvalsOption = 8,
    max_evals: MaxEvalsOption = 15000,
    conv1d: Conv1DOption = Conv1DMode.pooled,
    device: Annotated[
        Device,
        typer.Option(
            "--device",
            help="Where to compute eigenvalues (cuda needs torch).",
            rich_help_panel=ENGINE,
        ),
    ] = Device.cpu,
    precision: Annotated[
        Precision,
        typer.Option(
            "--precision",
            help="Precision of the Gram matrix and eigensolver. float32 is an opt-in for GPUs; "
            "it loses the smallest eigenvalues and is not faster on CPU.",
            rich_help_panel=ENGINE,
        ),
    ] = Precision.float64,
    jobs: JobsOption = None,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    cache: CacheOption = None,
    mp_fit: MpFitOption = False,
    randomize: RandomizeOption = False,
    seed: SeedOption = 0,
    fix_fingers: FixFingersOption = FixFingers.none,
    fit: FitOption = FitKind.power_law,
    tail_tests: TailTestsOption = False,
    detx: DetxOption = False,
    base: BaseOption = None,
    all_diagnostics: AllDiagnosticsOption = False,
    fail_on: FailOnOption = None,
    fail_below: Annotated[
        str,
        typer.Option(
            "--fail-below",
            metavar="ALPHA|TYPE=ALPHA,...",
            help="Exit 1 when a gated layer's alpha is below this; per layer type with "
            "dense=2,conv2d=1.8 (a plain number for the other types). Negative: off.",
            rich_help_panel=GATE,
        ),
    ] = "2",
    fail_above: Annotated[
        float | None,
        typer.Option(
            "--fail-above",
            metavar="ALPHA",
            help="Exit 1 when a gated layer's alpha is above this (6 marks a light tail). "
            "Off by default.",
            show_default=False,
            rich_help_panel=GATE,
        ),
    ] = None,
    fail_on_failed_fit: Annotated[
        bool,
        typer.Option(
            "--fail-on-failed-fit",
            help="Exit 1 when a gated layer's power-law fit failed.",
            rich_help_panel=GATE,
        ),
    ] = False,
    gate_min_evals: Annotated[
        int,
        typer.Option(
            "--gate-min-evals",
            min=0,
            metavar="N",
            help="Gate only layers with at least N eigenvalues (smaller ones are analyzed and "
            "shown, not gated): below 64, pure noise gets alpha < 2 in 1-58 % of draws.",
            rich_help_panel=GATE,
        ),
    ] = 64,
    gate_ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--gate-ignore",
            metavar="GLOB",
            help="Layer names the gate does not judge (kept in the report); repeatable.",
            show_default=False,
            rich_help_panel=GATE,
        ),
    ] = None,
    max_over_trained: Annotated[
        int,
        typer.Option(
            "--max-trips",
            "--max-over-trained",
            min=0,
            metavar="N",
            help="Exit 1 only when more than N gated layers trip (--max-over-trained: its "
            "older name).",
            rich_help_panel=GATE,
        ),
    ] = 0,
    baseline: Annotated[
        Path | None,
        _file_option(
            "--baseline",
            "A previous JSON report (--json or --write-baseline): fail only on layers "
            "newly over the line since (matched by name).",
            panel=GATE,
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            metavar="DELTA",
            help="With --baseline: also fail on a layer whose alpha fell by more than DELTA.",
            show_default=False,
            rich_help_panel=GATE,
        ),
    ] = None,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Pass when the gate judged no layer (otherwise that is exit 2: a selection "
            "that caught nothing gateable must not pass by accident).",
            rich_help_panel=GATE,
        ),
    ] = False,
    explain_gate: Annotated[
        bool,
        typer.Option(
            "--explain-gate",
            help="Say on stderr which rule the gate applied to which layer, and why the others "
            "were not gated.",
            rich_help_panel=GATE,
        ),
    ] = False,
    exit_zero: Annotated[
        bool,
        typer.Option(
            "--exit-zero",
            help="Report, but always exit 0 unless an error.",
            rich_help_panel=GATE,
        ),
    ] = False,
    summary_file: Annotated[
        Path | None,
        _file_option(
            "--summary",
            'Also write a Markdown job summary (e.g. "$GITHUB_STEP_SUMMARY").',
            panel=OUTPUT,
        ),
    ] = None,
    write_baseline: Annotated[
        Path | None,
        _file_option(
            "--write-baseline",
            "Also write this run's JSON report as a baseline for --baseline.",
            panel=GATE,
        ),
    ] = None,
    output_format: FormatOption = OutputFormat.table,
    csv_file: Annotated[
        Path | None,
        _file_option(
            "--csv",
            "Also write the results as CSV to this file.",
            panel=OUTPUT,
        ),
    ] = None,
    json_file: Annotated[
        Path | None,
        _file_option(
            "--json",
            "Also write the results as JSON to this file.",
            panel=OUTPUT,
        ),
    ] = None,
    plot: PlotOption = None,
    plot_format: PlotFormatOption = ImageFormat.png,
    html_file: HtmlOption = None,
    spectra_file: SpectraOption = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Compute alpha and the other spectral metrics of every weight matrix, show them, and
    exit 1 when a layer trips the gate (by default: alpha < 2, a very heavy-tailed spectrum;
    --fail-on EXPR gates on any metric, the diagnostics' too).

    Examples:

      wwcli analyze model.keras

      wwcli analyze model.pt --layers 1 --csv out.csv

      wwcli analyze ./hf-model/ --format json > report.json

      wwcli analyze run/ckpt-*.keras --fail-below 2 --fail-above 6

      wwcli analyze final.pt --mp-fit --base init.pt --fail-on 'delta_alpha < 2'
    """
    run = _Run(debug=debug, quiet=quiet)
    with _guard(run):
        gate = gate_from_cli(
            fail_below=fail_below,
            fail_above=fail_above,
            fail_on_failed_fit=fail_on_failed_fit,
            exit_zero=exit_zero,
            gate_min_evals=gate_min_evals,
            gate_ignore=gate_ignore or (),
            max_over_trained=max_over_trained,
            allow_empty=allow_empty,
            baseline=baseline,
            max_drop=max_drop,
            fail_on=fail_on or (),
            fail_below_given=_given(ctx, "fail_below"),
        )
        settings = settings_from_cli(
            layers=layers,
            min_evals=min_evals,
            max_evals=max_evals,
            trust_pickle=trust_pickle,
            device=device,
            precision=precision,
            conv1d=conv1d,
            keep_spectra=plot is not None or html_file is not None or spectra_file is not None,
            gate=gate,
            diagnostics=DiagnosticChoices(
                mp_fit, randomize, seed, fix_fingers, fit, tail_tests, detx, base, all_diagnostics
            ),
        )
        _say_left_out(run, settings, all_diagnostics)
        _check_device(settings)
        targets = [
            ReportFile(path, option, file_format)
            for path, option, file_format in (
                (csv_file, "--csv", "csv"),
                (json_file, "--json", "json"),
                (html_file, "--html", "html"),
                (spectra_file, "--spectra", "npz"),
                (write_baseline, "--write-baseline", "json"),
                (summary_file, "--summary", "markdown"),
            )
            if path is not None
        ]
        code = _analyze_and_emit(
            run,
            paths,
            settings,
            jobs=jobs,
            execution=(workers, scheduler, cache),
            stdout_format=_formatter(_default_format(ctx, output_format)),
            targets=targets,
            pictures=Pictures(plot, plot_format.value),
            explain_gate=explain_gate,
        )
    raise typer.Exit(code)


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether an option was set by the user (command line, environment or config file)."""
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", "DEFAULT") != "DEFAULT"


def _default_format(ctx: typer.Context, chosen: OutputFormat) -> OutputFormat:
    """--format as given; in a GitHub Actions job (GITHUB_ACTIONS=true) with no --format given
    (nor one from the config), annotations, as ruff does."""
    source = ctx.get_parameter_source("output_format")
    if getattr(source, "name", "") == "DEFAULT" and os.environ.get("GITHUB_ACTIONS") == "true":
        return OutputFormat.github
    return chosen


def _analyze_and_emit(
    run: _Run,
    paths: Sequence[Path],
    settings: RunSettings,
    *,
    jobs: int | None,
    stdout_format: Formatter | None,
    targets: Sequence[ReportFile],
    pictures: Pictures,
    explain_gate: bool = False,
    execution: tuple[int | None, str | None, Path | None] = (None, None, None),
) -> ExitCode:
    """analyze's and report's shared path: check every output before reading anything, run,
    emit. `execution`: --workers, --scheduler, --cache (wwcli/cli_sweep.py's runners)."""
    from wwcli.cli_sweep import execution_plan
    from wwcli.runners import default_jobs

    for target in targets:
        _check_output_target(target, paths)
    workers, scheduler, cache = execution
    with execution_plan(
        run,
        units=len(paths),
        settings=settings,
        jobs=jobs,
        workers=workers,
        scheduler=scheduler,
        cache=cache,
        spread=False,
    ) as plan:
        jobs = plan.runner.layer_jobs if jobs is None and workers else jobs or default_jobs()
        pictures = dataclasses.replace(pictures, jobs=jobs)
        _check_pictures(pictures, targets)
        result = _run_analysis(
            run,
            paths,
            settings,
            jobs=jobs,
            stdout_format=stdout_format,
            targets=targets,
            runner=plan.runner,
        )
        plan.finish(run)
    return emit(run, result, stdout_format, targets, pictures, explain_gate=explain_gate)


@app.command(cls=_Command)
def report(
    paths: PathsArgument,
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="The HTML file to write.",
            dir_okay=False,
            rich_help_panel=OUTPUT,
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
    mp_fit: MpFitOption = False,
    randomize: RandomizeOption = False,
    seed: SeedOption = 0,
    fix_fingers: FixFingersOption = FixFingers.none,
    fit: FitOption = FitKind.power_law,
    tail_tests: TailTestsOption = False,
    detx: DetxOption = False,
    base: BaseOption = None,
    all_diagnostics: AllDiagnosticsOption = False,
    plot: PlotOption = None,
    plot_format: PlotFormatOption = ImageFormat.png,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Write one self-contained HTML report of checkpoints: the summary, the table (very
    heavy-tailed rows marked as in the terminal), each checkpoint's overview figure and every
    layer's ESD plot, images embedded; it opens with no network and needs no JavaScript. Exits 0
    unless an input cannot be read (use analyze to gate). Needs wwcli[plot].

    Examples:

      wwcli report model.safetensors -o report.html

      wwcli report run/ckpt-*.keras -o run.html --layers dense
    """
    run = _Run(debug=debug, quiet=quiet)
    with _guard(run):
        settings = settings_from_cli(
            layers=layers,
            min_evals=min_evals,
            max_evals=max_evals,
            trust_pickle=trust_pickle,
            conv1d=conv1d,
            exit_zero=True,
            keep_spectra=True,
            diagnostics=DiagnosticChoices(
                mp_fit, randomize, seed, fix_fingers, fit, tail_tests, detx, base, all_diagnostics
            ),
        )
        _say_left_out(run, settings, all_diagnostics)
        code = _analyze_and_emit(
            run,
            paths,
            settings,
            jobs=jobs,
            stdout_format=None,
            targets=[ReportFile(output, "--output", "html")],
            pictures=Pictures(plot, plot_format.value),
        )
        if code is ExitCode.OK:
            run.info(f"report written to {output}")
    raise typer.Exit(code)


import wwcli.cli_sweep  # noqa: E402, F401 - registers `sweep` and `compare` on the app
