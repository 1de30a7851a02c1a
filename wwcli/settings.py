"""RunSettings: everything that decides what a run computes and how it is judged, in one frozen,
picklable value. The command line builds it (cli.settings_from_cli); the run layer, the gate and
the JSON `options` object read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wwcli.diagnostics import Diagnostics
from wwcli.engine.options import EngineOptions
from wwcli.gate import GatePolicy
from wwcli.selection import Term, parse_layers

_FIRST_KEYS = (
    "layers",
    "min_evals",
    "max_evals",
    "fail_below",
    "fail_above",
    "fail_on_failed_fit",
    "device",
    "precision",
)
"""The keys JSON reports have always had, first and in this order; every other setting follows
in field order (JSON keys are only ever added)."""


@dataclass(frozen=True)
class RunSettings:
    """What a run computes and how it judges it. How it is run (threads, processes) is the
    runner's business and never changes a number, so it is not here."""

    engine: EngineOptions = field(default_factory=EngineOptions)
    """Size filter, fit threshold, verdict thresholds and numerical backend."""
    layers: str | None = None
    """The --layers expression; None selects every layer."""
    trust_pickle: bool = False
    """Whether PyTorch files may unpickle arbitrary objects (which can run code)."""
    gate: GatePolicy = field(default_factory=GatePolicy)
    """What trips the exit-code gate."""
    keep_spectra: bool = False
    """Whether each analyzed layer's eigenvalues are kept in its result (for plots, --spectra)."""
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    """The optional diagnostics beyond the power-law fit (MP fit, randomized ESD, detX, the
    update against a base checkpoint); all off by default."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            parse_layers(self.layers)  # SelectionError now, not in the middle of a run
        self._check_rules()

    def _check_rules(self) -> None:
        """ValueError for a --fail-on rule that names a metric this run does not compute."""
        from wwcli.diagnostics import GROUP_OPTIONS
        from wwcli.gate import metric_names, parse_fail_on

        computed = self.groups()
        known = metric_names()
        for text in self.gate.fail_on:
            rule = parse_fail_on(text)
            for name in rule.names:
                missing = [group for group in known[name] if group not in computed]
                if missing:
                    options = " and ".join(GROUP_OPTIONS[group] for group in missing)
                    raise ValueError(
                        f"--fail-on {rule.text}: {name} is computed only with {options}"
                    )

    def terms(self) -> tuple[Term, ...]:
        """The parsed --layers expression (() selects every layer)."""
        return parse_layers(self.layers) if self.layers is not None else ()

    def groups(self) -> tuple[str, ...]:
        """The groups of optional columns this run computes (wwcli.diagnostics.run_groups)."""
        from wwcli.diagnostics import run_groups

        return run_groups(self.diagnostics, self.engine)

    def to_json(self) -> dict[str, Any]:
        """The settings as the JSON `options` object: every field, nested values flattened
        (engine and gate fields by their own names)."""
        values: dict[str, Any] = {}
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                for inner in dataclasses.fields(value):
                    values[inner.name] = _json_value(inner.name, getattr(value, inner.name))
            else:
                values[setting.name] = _json_value(setting.name, value)
        first = {key: values.pop(key) for key in _FIRST_KEYS}
        return {**first, **values}


_TABLES = ("fail_below_by_type",)
"""Settings held as tuples of (key, value) pairs, shown as JSON objects."""


def _json_value(name: str, value: Any) -> Any:
    """A setting as JSON: tuples as lists, a per-type table as an object, a baseline as the
    file it was read from."""
    source = getattr(value, "source", None)
    if dataclasses.is_dataclass(value) and isinstance(source, str):
        return source
    if name in _TABLES:
        return {str(key): item for key, item in value}
    if isinstance(value, tuple):
        return list(value)
    return value
