"""The `--layers` language: ids, ranges, names, globs, types and exclusions.

Tokens are separated by commas. A token is one of
  1          a layer id            2-5       a range of ids (inclusive)
  dense      a layer type          encoder.*.query   a name or glob (fnmatch)
  id:7, name:dense, type:conv2d     explicit forms, when a name looks like a type or a number
A leading "-" excludes what the token matches (-3, -lm_head, -embedding). With only exclusions,
they are taken from all layers. A token that matches no layer is an error listing what exists.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass

from wwcli.loaders.interface import LayerSpec, LayerType

TYPE_WORDS: dict[str, frozenset[LayerType]] = {
    "dense": frozenset({LayerType.DENSE}),
    "linear": frozenset({LayerType.DENSE}),
    "conv1d": frozenset({LayerType.CONV1D}),
    "conv2d": frozenset({LayerType.CONV2D}),
    "conv": frozenset({LayerType.CONV1D, LayerType.CONV2D}),
    "embedding": frozenset({LayerType.EMBEDDING}),
    "norm": frozenset({LayerType.NORM}),
}
"""Type words accepted in --layers, and the layer types each one means."""

_ID = re.compile(r"^\d+$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


class SelectionError(ValueError):
    """A --layers expression is malformed or matches nothing."""


@dataclass(frozen=True)
class Term:
    """One token of a --layers expression."""

    text: str
    """The token as written, without its leading "-"."""
    kind: str
    """"ids", "type" or "name"."""
    exclude: bool
    """True for tokens written with a leading "-"."""
    ids: tuple[int, int] = (0, -1)
    """Inclusive id range for kind "ids"."""
    types: frozenset[LayerType] = frozenset()
    """Layer types for kind "type"."""

    def matches(self, spec: LayerSpec) -> bool:
        """Whether this token selects `spec`."""
        if self.kind == "ids":
            return self.ids[0] <= spec.layer_id <= self.ids[1]
        if self.kind == "type":
            return spec.layer_type in self.types
        return spec.name == self.text or fnmatch.fnmatchcase(spec.name, self.text)


def _parse_term(token: str) -> Term:
    exclude = token.startswith("-")
    body = token[1:] if exclude else token
    if not body:
        raise SelectionError(f"empty token in --layers: {token!r}")
    prefix, sep, rest = body.partition(":")
    if sep and prefix in ("id", "name", "type"):
        if not rest:
            raise SelectionError(f"nothing after {prefix}: in --layers token {token!r}")
        if prefix == "name":
            return Term(rest, "name", exclude)
        if prefix == "type":
            if rest.lower() not in TYPE_WORDS:
                known = ", ".join(TYPE_WORDS)
                raise SelectionError(f"unknown layer type {rest!r}; known types: {known}")
            return Term(rest, "type", exclude, types=TYPE_WORDS[rest.lower()])
        body = rest
        if not (_ID.match(body) or _RANGE.match(body)):
            raise SelectionError(f"id:{body!r} is not an id or a range like 2-5")
    if _ID.match(body):
        return Term(body, "ids", exclude, ids=(int(body), int(body)))
    range_match = _RANGE.match(body)
    if range_match:
        low, high = int(range_match.group(1)), int(range_match.group(2))
        if low > high:
            raise SelectionError(f"empty id range {body!r} in --layers (write it low-high)")
        return Term(body, "ids", exclude, ids=(low, high))
    if body.lower() in TYPE_WORDS:
        return Term(body, "type", exclude, types=TYPE_WORDS[body.lower()])
    return Term(body, "name", exclude)


def parse_layers(expression: str) -> tuple[Term, ...]:
    """Parse a --layers expression; raises SelectionError on malformed tokens."""
    tokens = [token.strip() for token in expression.split(",")]
    if not any(tokens):
        raise SelectionError("--layers is empty")
    if any(not token for token in tokens):
        raise SelectionError(f"empty token in --layers {expression!r}")
    return tuple(_parse_term(token) for token in tokens)


def _describe_available(layers: Sequence[LayerSpec], limit: int = 40) -> str:
    shown = [f"{spec.layer_id} {spec.name} ({spec.layer_type.value})" for spec in layers[:limit]]
    more = f", ... and {len(layers) - limit} more" if len(layers) > limit else ""
    return "; ".join(shown) + more if shown else "no layers"


def select_layers(layers: Sequence[LayerSpec], terms: Sequence[Term]) -> list[LayerSpec]:
    """The layers `terms` select, in id order. A term that matches nothing raises
    SelectionError listing the layers that exist."""
    for term in terms:
        if not any(term.matches(spec) for spec in layers):
            sign = "-" if term.exclude else ""
            raise SelectionError(
                f"--layers {sign}{term.text} matches no layer; layers are: "
                + _describe_available(layers)
            )
    includes = [term for term in terms if not term.exclude]
    excludes = [term for term in terms if term.exclude]
    chosen = [
        spec
        for spec in layers
        if (not includes or any(term.matches(spec) for term in includes))
        and not any(term.matches(spec) for term in excludes)
    ]
    return chosen
