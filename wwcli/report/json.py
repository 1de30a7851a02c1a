"""JSON output: one object per run, with the DESIGN.md keys; NaN is null."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from wwcli import __version__
from wwcli.report.columns import finite_or_none
from wwcli.report.rows import analyze_rows, listing_rows
from wwcli.results import CheckpointListing, CheckpointReport, RunResult, Summary, summarize


def summary_object(summary: Summary) -> dict[str, Any]:
    """The "summary" member of a checkpoint object."""
    return {
        "layers_analyzed": summary.layers_analyzed,
        "layers_skipped": summary.layers_skipped,
        "fits_failed": summary.fits_failed,
        # The old keys stay (keys are never removed): the same ids as the two that follow.
        "over_trained": list(summary.very_heavy_tailed),
        "under_trained": list(summary.light_tail),
        "very_heavy_tailed": list(summary.very_heavy_tailed),
        "light_tail": list(summary.light_tail),
        **{name: finite_or_none(value) for name, value in summary.means.items()},
    }


def checkpoint_object(report: CheckpointReport, options: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's analysis as DESIGN.md's JSON object (with --base, also
    `base_unmatched`: the base checkpoint's layers this one does not have)."""
    document = _checkpoint_object(report, options)
    if "delta" in report.groups:
        document["base_unmatched"] = list(report.base_unmatched)
    return document


def _checkpoint_object(report: CheckpointReport, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "wwcli_version": __version__,
        "checkpoint": report.checkpoint,
        "format": report.format,
        "ids_note": report.ids_note,
        "source_note": report.source_note,
        "options": options,
        "layers": analyze_rows(report),
        "skipped": [
            {
                "layer_id": skipped.layer_id,
                "name": skipped.name,
                "layer_type": skipped.layer_type,
                "reason": skipped.reason,
            }
            for skipped in report.skipped
        ],
        "summary": summary_object(summarize(report)),
    }


def analyze_document(reports: Sequence[CheckpointReport], options: dict[str, Any]) -> Any:
    """The whole JSON document: the checkpoint object itself for one checkpoint; for several,
    {"wwcli_version", "options", "checkpoints": [checkpoint objects]}."""
    objects = [checkpoint_object(report, options) for report in reports]
    if len(objects) == 1:
        return objects[0]
    return {"wwcli_version": __version__, "options": options, "checkpoints": objects}


def run_document(run: RunResult) -> Any:
    """analyze_document of a run, its `options` from the run's settings."""
    return analyze_document(run.reports, run.settings.to_json())


def describe_document(listings: Sequence[CheckpointListing]) -> Any:
    """describe's JSON: per checkpoint {"wwcli_version", "checkpoint", "format", "ids_note",
    "source_note", "layers"}; several are wrapped in {"wwcli_version", "checkpoints": [...]}."""
    objects = [
        {
            "wwcli_version": __version__,
            "checkpoint": listing.checkpoint,
            "format": listing.format,
            "ids_note": listing.ids_note,
            "source_note": listing.source_note,
            "layers": listing_rows(listing),
        }
        for listing in listings
    ]
    if len(objects) == 1:
        return objects[0]
    return {"wwcli_version": __version__, "checkpoints": objects}


def render_json(document: Any) -> str:
    """The document as indented JSON text ending in a newline; refuses NaN (it must be null)."""
    return json.dumps(document, indent=2, allow_nan=False) + "\n"
