"""`--spectra FILE.npz`: the eigenvalues of every analyzed layer, so anyone can refit them."""

from __future__ import annotations

import io
import zipfile

import numpy as np

from wwcli.report.escape import encodable
from wwcli.results import RunResult


def spectra_arrays(run: RunResult) -> dict[str, np.ndarray]:
    """Every kept spectrum of the run, keyed by layer name (by "CHECKPOINT::NAME" when the run
    has several checkpoints). Layers whose eigenvalues could not be computed are left out."""
    several = len(run.reports) > 1
    arrays: dict[str, np.ndarray] = {}
    for report in run.reports:
        for result in report.layers:
            if result.spectrum is None:
                continue
            name = encodable(result.spec.name)
            key = f"{encodable(report.checkpoint)}::{name}" if several else name
            arrays[key] = np.asarray(result.spectrum.eigenvalues, dtype=np.float64)
    return arrays


def spectra_npz(run: RunResult) -> bytes:
    """The run's spectra as the bytes of an .npz archive (np.load reads it without pickles)."""
    buffer = io.BytesIO()
    # Written member by member (as np.savez does), so that a layer named like one of savez's
    # own arguments ("file", "allow_pickle") is a key like any other.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in spectra_arrays(run).items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED  # a fixed date: the same run, the same bytes
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()
