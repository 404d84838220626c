"""Config parsing helpers shared by the Lightning CLI and ``selfsup pipeline``."""

from __future__ import annotations

import inspect
import typing
from dataclasses import asdict, dataclass
from typing import Any, NoReturn, TypeVar

from selfsup import SelfsupError

S = TypeVar("S", bound="PlainData")


def short_message(message: str) -> str:
    """Reduce a jsonargparse error to one line: its first line (which key) and its most deeply
    nested line (what is wrong with it). jsonargparse nests the cause under the key, and a union's
    alternatives under the union, each one level deeper; the first of the deepest lines is the
    alternative that was meant (a module's arguments, not ``None``)."""
    lines = [ln.rstrip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return str(message)
    head = lines[0].strip()
    if len(lines) == 1:
        return head
    depth = max(len(ln) - len(ln.lstrip()) for ln in lines[1:])
    detail = next(ln.strip() for ln in lines[1:] if len(ln) - len(ln.lstrip()) == depth)
    return f"{head.rstrip(':')}: {detail.lstrip('- ')}"


class ConfigError(SelfsupError):
    """A config file or command-line argument that does not parse."""


class ConfigErrorMixin:
    """For jsonargparse parsers: raise a one-line ConfigError instead of printing usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # noqa: D102
        short = short_message(message)
        if "--help`)" in short:  # a subcommand's parser already said it
            raise ConfigError(short)
        prog = str(getattr(self, "prog", "selfsup")).replace(" [options]", "")
        raise ConfigError(f"{short} (see `{prog} --help`)")


def find_selfsup_error(e: BaseException | None) -> SelfsupError | None:
    """The SelfsupError in an exception's cause/context chain, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SelfsupError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


# A dataclass itself (with no fields): jsonargparse then reads the groups as nested sections,
# not as classes chosen by class_path.
@dataclass(frozen=True)
class PlainData:
    """For the typed argument groups of the stage modules (backbone, optimizer, online
    evaluation): frozen dataclasses that a module keeps as plain dicts in its hyperparameters,
    so that checkpoints load with ``torch.load(weights_only=True)``, and rebuilds with :meth:`of`.
    In a config each is a nested section (``optimizer: {name: sgd, lr: 0.1}``); on the command
    line ``--model.init_args.optimizer.lr 0.1``."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls: type[S], value: Any, default: S | None = None) -> S:
        """The group from itself, its dict (a checkpoint's hyperparameters), a Namespace of its
        fields (jsonargparse), or None (``default``, else the class defaults)."""
        if value is None:
            return default if default is not None else cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls(**vars(value))


def _plain_group(hint: Any) -> type[PlainData] | None:
    """The PlainData class in a type hint (``OptimizerSpec``, ``BackboneSpec | None``), if any."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and issubclass(t, PlainData):
            return t
    return None


def save_plain_hyperparameters(module: Any) -> None:
    """``module.save_hyperparameters()`` for the calling ``__init__``, with the typed argument
    groups (backbone, optimizer, ...; :class:`selfsup.config.PlainData`) stored as complete
    plain dicts, however they were given (a spec, a partial dict, a name, None), so that
    checkpoints load with ``torch.load(weights_only=True)`` and configs stay YAML."""
    here = inspect.currentframe()
    assert here is not None  # None only on Pythons without stack frames; CPython has them
    module.save_hyperparameters(frame=here.f_back)
    del here  # the frame would hold itself through this local until the garbage collector runs
    hints = typing.get_type_hints(type(module).__init__)
    # Both copies: the run config that loggers record is made from the initial ones.
    for hp in (module.hparams, module._hparams_initial):
        for key, value in hp.items():
            group = _plain_group(hints.get(key))
            if group is not None:
                hp[key] = group.of(value).as_dict()


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: ``lo`` / ``hi`` bounds (None: unbounded), each
    included unless ``open`` names it ("lo", "hi" or "both")."""

    lo: float | None = None
    hi: float | None = None
    open: str = ""

    def holds(self, v: float) -> bool:
        if v != v:  # NaN is in no range
            return False
        low = self.lo is None or (v > self.lo if self.open in ("lo", "both") else v >= self.lo)
        high = self.hi is None or (v < self.hi if self.open in ("hi", "both") else v <= self.hi)
        return low and high

    def __str__(self) -> str:
        if self.hi is None:
            assert self.lo is not None
            lo = f"{self.lo:g}"
            return f"more than {lo}" if self.open in ("lo", "both") else f"at least {lo}"
        left = "(" if self.open in ("lo", "both") else "["
        right = ")" if self.open in ("hi", "both") else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


#: The ranges most settings take.
COUNT, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, open="lo")
PROBABILITY, SHARE, AREA = Range(0, 1), Range(0, 1, "both"), Range(0, 1, "lo")
MOMENTUM = Range(0, 1, "hi")


def check_range(key: str, value: float | None, allowed: Range) -> None:
    """Stop in one line when a numeric setting is out of range: ``data.batch_size must be at
    least 1, got 0``. None (the setting's "not given") always passes."""
    if value is None or isinstance(value, bool):
        return
    if not allowed.holds(value):
        raise SelfsupError(f"{key} must be {allowed}, got {value}")


def check_ranges(section: str, checks: dict[str, tuple[float | None, Range]]) -> None:
    """:func:`check_range` for several settings of one section (``model.init_args``, ``data``)."""
    for name, (value, allowed) in checks.items():
        check_range(f"{section}.{name}" if section else name, value, allowed)
