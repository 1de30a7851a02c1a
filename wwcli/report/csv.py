"""CSV output: a header, then one row per layer; floats round-trip, NaN is an empty cell. Names
are kept exactly (the csv module quotes newlines), except lone surrogates, written as escapes."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from wwcli.report.escape import encodable
from wwcli.report.rows import Row, Value


def _cell(value: Value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return encodable(str(value))


def render_csv(rows: Iterable[Row], columns: Sequence[str]) -> str:
    """The rows as CSV text with `columns` as header, in that order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()
