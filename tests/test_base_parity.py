"""--base against weightwatcher 0.7.7's base_model=: a live PyTorch model and its base, built
here and saved to files; wwcli's numbers of the update W - W_base from the files equal
weightwatcher's `analyze(base_model=..., mp_fit=True)` on the live models. Skipped only where
weightwatcher or torch is not installed."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from wwcli.analysis import analyze_path
from wwcli.diagnostics import Diagnostics
from wwcli.report.rows import analyze_rows
from wwcli.results import CheckpointReport
from wwcli.settings import RunSettings

pytestmark = pytest.mark.filterwarnings("ignore::Warning")

weightwatcher = pytest.importorskip("weightwatcher")
torch = pytest.importorskip("torch")


def _models() -> tuple[Any, Any]:
    """A model and its base: dense and conv layers, the update sparse and heavy-tailed (a
    fine-tune moves few weights far), so that its alpha is a real fit."""
    torch.manual_seed(13)

    def make() -> Any:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 96),
            torch.nn.Conv2d(8, 16, 3),
            torch.nn.Linear(96, 10),
        )

    base, model = make(), make()
    with torch.no_grad():
        for tuned, original in zip(model.parameters(), base.parameters(), strict=True):
            tuned.copy_(
                original + 0.3 * torch.randn_like(original) * torch.rand_like(original) ** 3
            )
    return model, base


def _weightwatcher_delta(model: Any, base: Any) -> Any:
    logging.getLogger("weightwatcher").setLevel(logging.CRITICAL)
    with contextlib.redirect_stdout(io.StringIO()):
        watcher = weightwatcher.WeightWatcher(model=model, base_model=base)
        return watcher.analyze(mp_fit=True)


def test_the_update_has_weightwatchers_numbers(tmp_path: Path) -> None:
    model, base = _models()
    model_path, base_path = tmp_path / "model.pt", tmp_path / "base.pt"
    torch.save(model.state_dict(), model_path)
    torch.save(base.state_dict(), base_path)
    frame = _weightwatcher_delta(model, base)

    settings = RunSettings(diagnostics=Diagnostics(base=str(base_path), mp_fit=True))
    report = analyze_path(model_path, settings)
    assert isinstance(report, CheckpointReport), report
    rows = {str(row["name"]): row for row in analyze_rows(report)}
    compared = 0
    for _, theirs in frame.iterrows():
        ours = rows[str(theirs["name"])]
        assert ours["delta_base"] == ours["name"]
        assert ours["delta_num_pl_spikes"] == int(theirs["num_pl_spikes"])
        assert ours["delta_num_spikes"] == int(theirs["num_spikes"])
        for key, column in (
            ("delta_alpha", "alpha"),
            ("delta_D", "D"),
            ("delta_norm", "norm"),
            ("delta_spectral_norm", "spectral_norm"),
        ):
            expected = float(theirs[column])
            assert math.isclose(float(ours[key]), expected, rel_tol=1e-10, abs_tol=1e-12), (  # type: ignore[arg-type]
                theirs["name"],
                key,
                ours[key],
                expected,
            )
        compared += 1
    assert compared == 4  # every weight layer, the conv included
