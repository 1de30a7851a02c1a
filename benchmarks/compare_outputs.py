"""Compare wwcli's outputs on every shipped fixture between two git revisions.

    python benchmarks/compare_outputs.py OLD_REV [NEW_REV]

Checks out both revisions in temporary worktrees, runs `analyze` (JSON, CSV) and `describe`
(JSON, CSV) on every fixture with each, and reports which outputs are byte-identical. JSON
reports that differ only by keys added to the `options` object (keys are only ever added) are
listed as such; any other difference is printed and makes the exit code 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (("analyze", "json"), ("analyze", "csv"), ("describe", "json"), ("describe", "csv"))


def _outputs(tree: Path) -> dict[str, bytes]:
    fixtures = sorted(
        path
        for path in (tree / "fixtures").glob("*/*")
        if path.is_dir() or path.suffix in (".keras", ".h5", ".pt", ".ckpt", ".safetensors")
    )
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    outputs = {}
    for fixture in fixtures:
        relative = fixture.relative_to(tree)
        for command, output_format in COMMANDS:
            extra = ["--exit-zero", "-j", "1"] if command == "analyze" else []
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "wwcli",
                    command,
                    str(relative),
                    "-f",
                    output_format,
                    *extra,
                ],
                cwd=tree,
                capture_output=True,
                env=environment,
                check=False,
            )
            outputs[f"{relative} {command} {output_format}"] = (
                done.stdout + f"\nexit {done.returncode}\n".encode()
            )
    return outputs


def _only_added_options(old: bytes, new: bytes) -> list[str] | None:
    """The option keys `new` adds, when that is the only difference; None otherwise."""
    old_text, old_exit = old.rsplit(b"\nexit ", 1)
    new_text, new_exit = new.rsplit(b"\nexit ", 1)
    if old_exit != new_exit:
        return None
    old_document, new_document = json.loads(old_text), json.loads(new_text)
    added = sorted(set(new_document["options"]) - set(old_document["options"]))
    for key in added:
        del new_document["options"][key]
    return added if old_document == new_document else None


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    old_rev, new_rev = argv[0], argv[1] if len(argv) == 2 else "HEAD"
    with tempfile.TemporaryDirectory() as scratch:
        trees = []
        for name, rev in (("old", old_rev), ("new", new_rev)):
            tree = Path(scratch) / name
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(tree), rev], cwd=ROOT, check=True
            )
            trees.append(tree)
        try:
            old, new = (_outputs(tree) for tree in trees)
        finally:
            for tree in trees:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
                )
    identical = differ = 0
    for key in sorted(old):
        if old[key] == new.get(key):
            identical += 1
            continue
        added = (
            _only_added_options(old[key], new[key]) if key.endswith("json") and key in new else None
        )
        if added is not None:
            identical += 1
            print(f"{key}: identical but for added options keys {added}")
        else:
            differ += 1
            print(f"{key}: DIFFERS")
    print(f"{identical} outputs identical (or only with added options keys), {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
