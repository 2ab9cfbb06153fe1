"""The school directory: a CSV export from the MIS (address, role, group) that says who is who."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from milter.errors import Problem, RulesError
from milter.policy.schema import Role

REQUIRED_COLUMNS = ("address", "role")


@dataclass(frozen=True)
class Person:
    address: str
    role: Role
    group: str


class Directory:
    """Address -> Person; lookups are case-insensitive on the whole address."""

    def __init__(self, people: dict[str, Person]) -> None:
        self._people = people

    def get(self, address: str | None) -> Person | None:
        return self._people.get(address.lower()) if address else None

    def __len__(self) -> int:
        return len(self._people)

    @classmethod
    def load(cls, path: Path) -> Directory:
        problems: list[Problem] = []
        people: dict[str, Person] = {}
        try:
            handle = path.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise RulesError([Problem(path, None, f"cannot read the directory: {exc.strerror}")]) from None
        with handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise RulesError([Problem(path, 1, f"the header row lacks column(s): {', '.join(missing)}")])
            reader.fieldnames = columns
            try:
                for row in reader:
                    line = reader.line_num
                    address = (row.get("address") or "").strip().lower()
                    role = (row.get("role") or "").strip().lower()
                    if not address and not role:
                        continue
                    if address.count("@") != 1 or address.startswith("@") or address.endswith("@"):
                        problems.append(Problem(path, line, f"{address!r} is not an email address"))
                        continue
                    try:
                        person = Person(address, Role(role), (row.get("group") or "").strip())
                    except ValueError:
                        roles = ", ".join(r.value for r in Role)
                        problems.append(
                            Problem(path, line, f"unknown role {role!r} (expected one of: {roles})")
                        )
                        continue
                    if address in people:
                        problems.append(Problem(path, line, f"{address} is listed twice"))
                        continue
                    people[address] = person
            except (csv.Error, UnicodeDecodeError) as exc:
                problems.append(Problem(path, reader.line_num, f"not valid CSV: {exc}"))
        if problems:
            raise RulesError(problems)
        return cls(people)
