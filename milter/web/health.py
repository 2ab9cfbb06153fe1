"""Scanner health for the dashboard, read from the gateway's Prometheus endpoint.

`school_milter_dependency_up{dependency="..."}` is 1 when a dependency works. When the
endpoint cannot be read the console says "unknown" rather than guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

METRIC = "school_milter_dependency_up"
# Shown even when the gateway has not reported them (yet): the checks people ask about.
EXPECTED = ("rules", "clamd")
_LINE = re.compile(
    r"^" + METRIC + r"\{(?P<labels>[^}]*)\}\s+(?P<value>[-+0-9.eE]+|NaN|[+-]Inf)(?:\s+\d+)?\s*$"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Dependency:
    name: str
    state: str  # up | down | unknown


@dataclass(frozen=True)
class Health:
    dependencies: tuple[Dependency, ...]
    reachable: bool
    note: str


def parse(text: str) -> dict[str, str]:
    states: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group("labels")))
        name = labels.get("dependency")
        if not name:
            continue
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        states[name] = "up" if value >= 1 else "down"
    return states


def read_health(url: str, timeout: float = 2.0) -> Health:
    if not url:
        return Health(
            tuple(Dependency(n, "unknown") for n in EXPECTED), False, "no metrics address configured"
        )
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=False)
        response.raise_for_status()
        states = parse(response.text[:1_000_000])
    except (httpx.HTTPError, ValueError) as exc:
        note = f"the gateway's metrics could not be read ({type(exc).__name__})"
        return Health(tuple(Dependency(n, "unknown") for n in EXPECTED), False, note)
    names = list(EXPECTED) + sorted(set(states) - set(EXPECTED))
    deps = tuple(Dependency(n, states.get(n, "unknown")) for n in names)
    return Health(deps, True, "" if states else "the gateway reports no dependency states")
