"""Reading TOML configuration with errors that name the file, table and key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the bad key."""


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


@dataclass(frozen=True)
class Table:
    """One TOML table, remembering where it came from for error messages."""

    path: Path
    name: str
    data: dict[str, Any]

    def where(self, key: str) -> str:
        return f"{self.path}: [{self.name}] {key}" if self.name else f"{self.path}: {key}"

    def table(self, key: str, required: bool = True) -> Table:
        value = self.data.get(key)
        if value is None and not required:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.where(key)}: expected a table [{key}]")
        name = f"{self.name}.{key}" if self.name else key
        return Table(self.path, name, value)

    def tables(self, key: str) -> list[Table]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self.where(key)}: expected an array of tables [[{key}]]")
        name = f"{self.name}.{key}" if self.name else key
        return [Table(self.path, f"{name}[{i}]", v) for i, v in enumerate(value)]

    def get(self, key: str, kind: type[T], default: T | None = None) -> T:
        value = self.data.get(key, default)
        if value is None:
            raise ConfigError(f"{self.where(key)}: required")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.where(key)}: expected {kind.__name__}, got {value!r}")
        return value

    def path_of(self, key: str, must_exist: bool = True) -> Path:
        raw = Path(self.get(key, str))
        resolved = raw if raw.is_absolute() else (self.path.parent / raw)
        if must_exist and not resolved.exists():
            raise ConfigError(f"{self.where(key)}: file not found: {resolved}")
        return resolved

    def reject_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise ConfigError(
                f"{self.where(unknown[0])}: unknown key (expected one of: {', '.join(sorted(known))})"
            )


def root(path: Path) -> Table:
    return Table(path, "", load_toml(path))
