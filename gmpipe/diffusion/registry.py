"""Name -> class registries for the diffusion value objects, and the config dicts that recreate them.

A registered class is a frozen dataclass; its config is {"name": <registered name>, **its fields}, so an
objective can be written next to a trained model and rebuilt from it. A new schedule, target, weighting
or time density is added by decorating its class with the sibling registry's `register(name)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, type], Generic[T]):
    """A read-only mapping from names to classes of one kind (e.g. "schedule"), filled by `register`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: register the class under `name` and record the name on it as `name`."""

        def add(cls: type) -> type:
            if name in self._classes:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            cls.name = name
            self._classes[name] = cls
            return cls

        return add

    def create(self, name: str, **params: Any) -> T:
        """Instantiate the class registered as `name` with keyword parameters."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {sorted(self._classes)}")
        try:
            return self._classes[name](**params)
        except TypeError as error:
            raise ValueError(f"bad parameters for {self.kind} {name!r}: {error}") from None

    def from_config(self, config: str | Mapping[str, Any]) -> T:
        """Instantiate from a name or from a {"name": ..., **params} dict (the inverse of `config_of`)."""
        if isinstance(config, str):
            return self.create(config)
        params = dict(config)
        if "name" not in params:
            raise ValueError(f"a {self.kind} config needs a 'name' key, got {sorted(params)}")
        return self.create(params.pop("name"), **params)

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)


def config_of(value: Any) -> dict[str, Any]:
    """{"name": registered name, **dataclass fields} of a registered value object."""
    fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    return {"name": type(value).name, **fields}
