"""Declarative, strict key maps between foreign checkpoints and our parameter names.

A key map is a table of rules ``(source pattern -> our name(s), transform)``. Patterns use ``{i}``
style placeholders for layer numbers, e.g.::

    rule("vision_model.encoder.layers.{i}.self_attn.out_proj.weight",
         "vision.transformer.blocks.{i}.attn.o_proj.weight")
    rule("visual.transformer.resblocks.{i}.attn.in_proj_weight",
         [f"vision.transformer.blocks.{{i}}.attn.{p}_proj.weight" for p in "qkv"], split(3))

Applying a map to a checkpoint gives our state dict and a :class:`KeyMapReport`. Every source key
must be matched by a rule or listed in the map's ``ignore`` patterns (buffers such as
``position_ids``), every parameter of our model must be provided, and every tensor must arrive
with the shape our model expects. Anything else fails by default, because a silently half-loaded
model is the worst bug a converter can have. The same table, run backwards, exports our weights.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from imagefm.checkpoint import CheckpointError, load_into

Shape = tuple[int, ...]


class KeyMapError(CheckpointError):
    """A checkpoint does not match its key map; ``report`` lists every offending key."""

    def __init__(self, message: str, report: KeyMapReport | None = None) -> None:
        super().__init__(message)
        self.report = report


# --- transforms ----------------------------------------------------------------------------------
# A transform turns one source tensor into our tensor(s) and back. ``shapes`` are the shapes our
# model expects for the outputs (None where unknown); transforms that can't produce them raise
# ValueError, which the report lists as a mis-shaped key.


class Transform:
    """Identity: the tensor is stored the same way on both sides."""

    name = "identity"

    def to_ours(self, tensor: torch.Tensor, shapes: Sequence[Shape | None]) -> list[torch.Tensor]:
        return [tensor]

    def to_source(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0]

    def __repr__(self) -> str:
        return self.name


class Transpose(Transform):
    """A matrix used as ``x @ proj`` on the source side and as ``nn.Linear`` (``x @ W.T``) here."""

    name = "transpose"

    def to_ours(self, tensor: torch.Tensor, shapes: Sequence[Shape | None]) -> list[torch.Tensor]:
        if tensor.dim() != 2:
            raise ValueError(f"transpose needs a matrix, got shape {tuple(tensor.shape)}")
        return [tensor.t().contiguous()]

    def to_source(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].t().contiguous()


class Split(Transform):
    """A fused projection (``in_proj_weight`` [3w, w]) split along dim 0 into equal parts."""

    def __init__(self, parts: int) -> None:
        self.parts = parts
        self.name = f"split({parts})"

    def to_ours(self, tensor: torch.Tensor, shapes: Sequence[Shape | None]) -> list[torch.Tensor]:
        if tensor.dim() == 0 or tensor.shape[0] % self.parts:
            raise ValueError(f"cannot split shape {tuple(tensor.shape)} into {self.parts} "
                             f"equal parts along dim 0")
        return [t.contiguous() for t in tensor.chunk(self.parts, dim=0)]

    def to_source(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(tensors), dim=0)


class Reshape(Transform):
    """Same values, different shape: e.g. a logit scale stored as [1] there and [] here.

    Loading reshapes to the shape our model expects (the element count must agree); exporting
    reshapes to ``source_shape``.
    """

    def __init__(self, source_shape: Shape) -> None:
        self.source_shape = tuple(source_shape)
        self.name = f"reshape{self.source_shape}"

    def to_ours(self, tensor: torch.Tensor, shapes: Sequence[Shape | None]) -> list[torch.Tensor]:
        target = shapes[0]
        if target is None or tensor.numel() != _numel(target):
            return [tensor]  # left as is: the shape check reports it
        return [tensor.reshape(target)]

    def to_source(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return tensors[0].reshape(self.source_shape)


IDENTITY = Transform()
TRANSPOSE = Transpose()


def split(parts: int = 3) -> Split:
    return Split(parts)


def reshape(source_shape: Shape) -> Reshape:
    return Reshape(source_shape)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- rules and maps ------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    """``a.{i}.b`` -> regex with a named group of digits per placeholder."""
    parts = _PLACEHOLDER.split(pattern)
    seen: set[str] = set()
    regex = ""
    for index, part in enumerate(parts):
        if index % 2 == 0:
            regex += re.escape(part)
        elif part in seen:
            regex += f"(?P={part})"
        else:
            seen.add(part)
            regex += rf"(?P<{part}>\d+)"
    return re.compile(regex)


@dataclass(frozen=True)
class Rule:
    """One source pattern, the name(s) it becomes in our model, and how the tensor changes."""

    source: str
    ours: tuple[str, ...]
    transform: Transform = IDENTITY
    source_re: re.Pattern[str] = field(init=False, repr=False, compare=False)
    ours_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_re", _compile(self.source))
        object.__setattr__(self, "ours_re", _compile(self.ours[0]))
        source_names = set(_PLACEHOLDER.findall(self.source))
        for name in self.ours:
            if set(_PLACEHOLDER.findall(name)) != source_names:
                raise ValueError(f"rule {self.source!r} -> {name!r}: placeholders differ")


def rule(source: str, ours: str | Sequence[str], transform: Transform = IDENTITY) -> Rule:
    """A rule; ``ours`` is one name, or several for a transform that splits the tensor."""
    return Rule(source, (ours,) if isinstance(ours, str) else tuple(ours), transform)


@dataclass
class KeyMapReport:
    """What applying a key map did: loaded keys, and every problem found."""

    map_name: str
    where: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # our parameters nothing provided
    unexpected: list[str] = field(default_factory=list)  # source keys no rule explains
    mis_shaped: list[str] = field(default_factory=list)  # readable "source -> ours" lines
    ignored: list[str] = field(default_factory=list)  # source keys the map lists as ignorable

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mis_shaped)

    def __str__(self) -> str:
        head = f"{self.map_name}" + (f" ({self.where})" if self.where else "")
        lines = [f"{head}: {len(self.loaded)} tensors loaded, {len(self.ignored)} ignored"]
        sections = (
            ("missing (our parameters the checkpoint does not provide)", self.missing),
            ("unexpected (checkpoint keys no rule maps)", self.unexpected),
            ("mis-shaped", self.mis_shaped),
        )
        for title, items in sections:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items[:40])
                if len(items) > 40:
                    lines.append(f"    ... and {len(items) - 40} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class KeyMap:
    """A table of rules plus the source patterns that are known to carry no weights."""

    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ignore_re", tuple(_compile(p) for p in self.ignore))

    def _match(self, key: str) -> tuple[Rule, dict[str, str]] | None:
        found = [(r, m.groupdict()) for r in self.rules if (m := r.source_re.fullmatch(key))]
        if len(found) > 1:
            raise KeyMapError(f"key map {self.name!r} is ambiguous: {key!r} matches "
                              f"{[r.source for r, _ in found]}")
        return found[0] if found else None

    def to_ours(
        self,
        source: Mapping[str, torch.Tensor],
        expected: Mapping[str, Shape],
        where: str = "",
    ) -> tuple[dict[str, torch.Tensor], KeyMapReport]:
        """Rename and transform ``source`` into our names; ``expected`` maps our names to shapes.

        Never raises for a bad checkpoint: the report says what is wrong, the caller decides.
        """
        report = KeyMapReport(self.name, where)
        out: dict[str, torch.Tensor] = {}
        bad_targets: set[str] = set()
        for key in sorted(source):
            tensor = source[key]
            matched = self._match(key)
            if matched is None:
                if any(p.fullmatch(key) for p in self._ignore_re):  # type: ignore[attr-defined]
                    report.ignored.append(key)
                else:
                    report.unexpected.append(key)
                continue
            found_rule, binding = matched
            names = [name.format(**binding) for name in found_rule.ours]
            shapes = [tuple(expected[n]) if n in expected else None for n in names]
            if any(s is None for s in shapes):
                absent = [n for n, s in zip(names, shapes, strict=True) if s is None]
                report.unexpected.append(f"{key} (would be {', '.join(absent)}, which this "
                                         f"model does not have)")
                continue
            try:
                tensors = found_rule.transform.to_ours(tensor, shapes)
            except ValueError as err:
                report.mis_shaped.append(f"{key} {_fmt(tensor.shape)} -> {', '.join(names)}: "
                                         f"{err}")
                bad_targets.update(names)
                continue
            for name, value, shape in zip(names, tensors, shapes, strict=True):
                if tuple(value.shape) != shape:
                    report.mis_shaped.append(
                        f"{key} {_fmt(tensor.shape)} -> {name}: expected {_fmt(shape)}, got "
                        f"{_fmt(value.shape)} after {found_rule.transform!r}")
                    bad_targets.add(name)
                elif name in out:
                    report.unexpected.append(f"{key} (maps to {name}, already provided)")
                else:
                    out[name] = value
                    report.loaded.append(name)
        report.missing = sorted(set(expected) - set(out) - bad_targets)
        return out, report

    def to_source(self, ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict in the source's names (export). Every one of our tensors must be used."""
        out: dict[str, torch.Tensor] = {}
        used: set[str] = set()
        for found_rule in self.rules:
            for key in ours:
                match = found_rule.ours_re.fullmatch(key)
                if match is None:
                    continue
                binding = match.groupdict()
                names = [name.format(**binding) for name in found_rule.ours]
                absent = [n for n in names if n not in ours]
                if absent:
                    raise KeyMapError(f"{self.name}: cannot export {key} without {absent}")
                out[found_rule.source.format(**binding)] = found_rule.transform.to_source(
                    [ours[n] for n in names])
                used.update(names)
        left = sorted(set(ours) - used)
        if left:
            raise KeyMapError(f"{self.name} cannot hold these parameters of the model: "
                              f"{', '.join(left[:20])}" + (" ..." if len(left) > 20 else ""))
        return out


def _fmt(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def load_with_key_map(
    model: nn.Module,
    key_map: KeyMap,
    source: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    where: str = "",
) -> KeyMapReport:
    """Load ``source`` into ``model`` through ``key_map``.

    ``strict=True`` (the default) raises :class:`KeyMapError` with the full report when any key is
    missing, unexpected or mis-shaped, and leaves the model untouched. ``strict=False`` warns with
    the same report and loads what matched (the rest keeps its initial values).
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state, report = key_map.to_ours(source, expected, where)
    if not report.ok:
        if strict:
            raise KeyMapError(f"checkpoint does not match its key map:\n{report}\n"
                              f"(pass strict=False to load the matching tensors anyway)", report)
        warnings.warn(f"loading a partial checkpoint:\n{report}", stacklevel=2)
    load_into(model, state)
    return report
