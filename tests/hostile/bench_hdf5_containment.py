"""What reading HDF5 in a helper process costs: `wwcli describe` and `wwcli analyze` of every
Keras fixture, end to end, with the helper (the default) and in-process
(WWCLI_HDF5_IN_PROCESS=1), runs interleaved so that load on the machine hits both alike; then the
loader alone, in one process: the helper's start, and each file's open + layers + matrices.

    .venv/bin/python tests/hostile/bench_hdf5_containment.py [--runs 7]

Prints medians in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "keras"


def _cli_ms(args: list[str], *, in_process: bool) -> float:
    environment = dict(os.environ)
    environment.pop("WWCLI_HDF5_IN_PROCESS", None)
    if in_process:
        environment["WWCLI_HDF5_IN_PROCESS"] = "1"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "wwcli", *args],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return (time.perf_counter() - start) * 1000


def _loader_ms(path: Path, *, read_matrices: bool) -> float:
    from wwcli.loaders import open_checkpoint

    start = time.perf_counter()
    with open_checkpoint(path) as checkpoint:
        for spec in checkpoint.layers():
            if read_matrices and spec.analyzable:
                checkpoint.matrices(spec)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    files = sorted(FIXTURES.glob("*.keras")) + sorted(FIXTURES.glob("*.h5"))

    print("end to end, median ms (helper / in-process / difference)")
    for command in (["describe"], ["analyze", "--exit-zero", "--jobs", "1"]):
        for path in files:
            helper, local = [], []
            for _ in range(runs):
                helper.append(_cli_ms([*command, str(path)], in_process=False))
                local.append(_cli_ms([*command, str(path)], in_process=True))
            a, b = statistics.median(helper), statistics.median(local)
            print(f"  {command[0]:8} {path.name:26} {a:7.0f} {b:7.0f} {a - b:+7.0f}")

    print("loader only, in one process, median ms (helper / in-process)")
    from wwcli.loaders import isolated

    starts = []
    for _ in range(runs):
        isolated._stop_shared_worker()
        start = time.perf_counter()
        isolated._shared_worker(files[0])
        starts.append((time.perf_counter() - start) * 1000)
    print(f"  helper start (python, numpy, h5py, then a greeting): {statistics.median(starts):.0f}")
    for read_matrices in (False, True):
        label = "open + layers + matrices" if read_matrices else "open + layers"
        for path in files:
            helper, local = [], []
            for _ in range(runs):
                os.environ.pop(isolated.IN_PROCESS_ENV, None)
                helper.append(_loader_ms(path, read_matrices=read_matrices))
                os.environ[isolated.IN_PROCESS_ENV] = "1"
                local.append(_loader_ms(path, read_matrices=read_matrices))
            os.environ.pop(isolated.IN_PROCESS_ENV, None)
            print(
                f"  {label:25} {path.name:26} {statistics.median(helper):7.1f} "
                f"{statistics.median(local):7.1f}"
            )


if __name__ == "__main__":
    main()
