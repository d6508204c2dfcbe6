"""Validation of config sections: every problem named by key and value, all of them at once."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable

from phoenix_flax.errors import PhoenixError


class ConfigError(PhoenixError, ValueError):
    """One or more problems with a config, each naming the key and the value."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)

    def within(self, section: str) -> ConfigError:
        """The same problems with their keys prefixed by the section's name (`model.emb_size=...`)."""
        return ConfigError(f"{section}.{p}" for p in self.problems)


class Checks:
    """Collects a section's problems: `Checks(cfg).at_least("steps", 1).positive("lr").raise_if_any()`."""

    def __init__(self, section):
        self.section = section
        self.problems: list[str] = []

    def _value(self, name: str):
        return getattr(self.section, name)

    def problem(self, name: str, why: str) -> Checks:
        self.problems.append(f"{name}={self._value(name)!r}: {why}")
        return self

    def require(self, ok: bool, name: str, why: str) -> Checks:
        return self if ok else self.problem(name, why)

    def at_least(self, low, *names: str) -> Checks:
        for name in names:
            self.require(self._value(name) >= low, name, f"must be at least {low}")
        return self

    def positive(self, *names: str) -> Checks:
        for name in names:
            value = self._value(name)
            self.require(math.isfinite(value) and value > 0, name, "must be a positive number")
        return self

    def between(self, low, high, *names: str, high_open: bool = False) -> Checks:
        for name in names:
            value = self._value(name)
            ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
            self.require(ok, name, f"must be in [{low}, {high}{')' if high_open else ']'}")
        return self

    def literals(self) -> Checks:
        """Every `Literal[...]` field holds one of its values."""
        for name, tp in typing.get_type_hints(type(self.section)).items():
            if typing.get_origin(tp) is typing.Literal and self._value(name) not in typing.get_args(tp):
                self.problem(name, f"expected one of {list(typing.get_args(tp))}")
        return self

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)
