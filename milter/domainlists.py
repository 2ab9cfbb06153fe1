"""Domain blocklists by category: load rules/domains/*.txt and tell whether a host is listed.

File format: one domain per line; "#" starts a comment (whole line or after
the domain); blank lines are ignored. A listed domain also covers every
subdomain of it. "*.example.com" and ".example.com" mean the same as
"example.com". Unicode (IDN) and punycode spellings are the same entry. The
file name without ".txt" is the category ("adult.txt" -> "adult").

Hosts and entries are compared in the canonical form of milter.urls
(lowercase ASCII, punycode for IDN), so a lookup is a few dict probes, one per
label of the host, however long the lists are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from milter.errors import Problem, RulesError
from milter.urls import icann_public_suffix, normalize_host

__all__ = ["DomainLists", "DomainMatch"]

# A file with a wrong format (say a hosts file or a URL list) would otherwise
# produce one problem per line, a million for a big feed; the first ones say
# what is wrong and the count says how much.
MAX_PROBLEMS_PER_FILE = 100

_CATEGORY_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_PORT_RE = re.compile(r":[0-9]*")
# The shape of nearly every line of a big feed: a plain ASCII name, maybe with
# "*." or "." in front. Its canonical form is just its lowercase, so these
# skip the general parser (a 1-million-line list loads about twice as fast).
# The last label starts with a letter, so it cannot be an IPv4 address.
_PLAIN_RE = re.compile(r"(?:\*?\.)?((?:[A-Za-z0-9_-]{1,63}\.)+[A-Za-z][A-Za-z0-9-]{0,62})\.?")


@dataclass(frozen=True)
class DomainMatch:
    """A host is listed: which entry matched it and in which category."""

    domain: str  # the listed domain that matched, canonical form
    category: str  # the list it is in (file stem): adult, hate, malware, ...


def _entry_problem(entry: str) -> str | None:
    """Why an entry is not written as a bare domain, in words for the person editing the list."""
    fields = entry.split()
    if len(fields) > 1:
        if normalize_host(fields[0]) is not None and fields[0][-1:].isdigit():
            return f"{entry!r} looks like hosts-file format; write the domain alone ({fields[-1]!r})"
        return f"{entry!r} has spaces in it; write one domain per line"
    if "://" in entry or (_SCHEME_RE.match(entry) and "@" in entry):
        return f"{entry!r} is a URL; write just its domain, without the scheme or path"
    if "@" in entry:
        return f"{entry!r} looks like an email address; write just the domain after the '@'"
    if "/" in entry or "\\" in entry:
        return f"{entry!r} has a path; write just the domain (a list cannot block single pages)"
    return None


def _parse_entry(entry: str) -> tuple[str | None, str | None]:
    """(canonical domain, None) or (None, reason it was refused)."""
    plain = _PLAIN_RE.fullmatch(entry)
    if plain and len(plain.group(1)) <= 253:
        domain = plain.group(1).lower()
        if "xn--" not in domain:  # punycode must be checked, so it takes the long way
            if icann_public_suffix(domain):
                return None, _suffix_reason(entry)
            return domain, None
    problem = _entry_problem(entry)
    if problem:
        return None, problem
    bare = entry[2:] if entry.startswith("*.") else entry[1:] if entry.startswith(".") else entry
    domain = normalize_host(bare)
    if domain is None:
        if ":" in bare and _PORT_RE.fullmatch(bare[bare.rfind(":") :]):
            return None, f"{entry!r} has a port; write just the domain"
        return None, f"{entry!r} is not a valid domain name"
    if ":" in domain or domain.rpartition(".")[2].isdigit():
        return domain, None  # an IP address: matched exactly
    if "." not in domain:
        return None, (
            f"{entry!r} is a single name (a top-level domain or a local host name); "
            "listing it would block far too much"
        )
    if icann_public_suffix(domain):
        return None, _suffix_reason(entry)
    return domain, None


def _suffix_reason(entry: str) -> str:
    return (
        f"{entry!r} is a public suffix shared by unrelated owners (like 'co.uk'); "
        "listing it would block every site under it"
    )


def _entries(text: str) -> Iterator[tuple[int, str]]:
    """(line number, entry) for each line that has one, with comments and blanks skipped."""
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.partition("#")[0].strip()
        if entry:
            yield number, entry


class DomainLists:
    """Every domain list of a rules directory, ready for lookups.

    Build it with DomainLists.load(); the constructor takes already-canonical
    domains, each mapped to the categories (in file-name order) that list it.
    """

    def __init__(self, domains: Mapping[str, tuple[str, ...]], categories: list[str]) -> None:
        self._domains = dict(domains)
        self._categories = sorted(categories)

    @classmethod
    def load(cls, directory: Path) -> DomainLists:
        """Read every *.txt in directory; raise RulesError naming each bad line (file, line, reason)."""
        if not directory.is_dir():
            raise RulesError([Problem(directory, None, "domain list directory not found")])
        problems: list[Problem] = []
        domains: dict[str, tuple[str, ...]] = {}
        categories: list[str] = []
        for path in sorted(directory.glob("*.txt")):
            category = path.stem
            if not _CATEGORY_RE.fullmatch(category):
                reason = (
                    f"file name {path.name!r} is not a category name: use lowercase letters, "
                    "digits, '-' and '_' (for example 'adult.txt')"
                )
                problems.append(Problem(path, None, reason))
                continue
            categories.append(category)
            problems.extend(_load_file(path, category, domains))
        if problems:
            raise RulesError(problems)
        return cls(domains, categories)

    def match(self, host: str) -> DomainMatch | None:
        """The most specific listed domain that is host or a parent of it; None if none is listed.

        "www.example.com" matches an entry "example.com"; "notexample.com" does not.
        When a domain is in several lists, the first category by file name is given.
        """
        canonical = normalize_host(host)
        if canonical is None:
            return None
        if ":" in canonical or canonical.rpartition(".")[2].isdigit():
            categories = self._domains.get(canonical)  # IPs have no parents
            return DomainMatch(canonical, categories[0]) if categories else None
        candidate = canonical
        while True:
            categories = self._domains.get(candidate)
            if categories:
                return DomainMatch(candidate, categories[0])
            dot = candidate.find(".")
            if dot < 0:
                return None
            candidate = candidate[dot + 1 :]

    def categories(self) -> list[str]:
        """The category names, one per list file, sorted."""
        return list(self._categories)

    def __len__(self) -> int:
        """How many distinct domains are listed, over all categories."""
        return len(self._domains)


def _load_file(path: Path, category: str, domains: dict[str, tuple[str, ...]]) -> list[Problem]:
    """Add one list's entries to domains; return its problems (capped, then a count of the rest)."""
    try:
        # utf-8-sig: Windows editors often put a byte-order mark at the start.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        return [Problem(path, line, "not UTF-8 text; save the file as UTF-8")]
    except OSError as err:
        return [Problem(path, None, f"cannot read: {err.strerror or err}")]
    problems: list[Problem] = []
    extra = 0
    only_this = (category,)  # shared by every entry of the file, so a big list costs no tuple each
    for number, entry in _entries(text):
        domain, reason = _parse_entry(entry)
        if domain is None:
            if len(problems) < MAX_PROBLEMS_PER_FILE:
                problems.append(Problem(path, number, reason or "not a domain"))
            else:
                extra += 1
            continue
        listed = domains.get(domain)
        if listed is None:
            domains[domain] = only_this
        elif category not in listed:
            domains[domain] = (*listed, category)
    if extra:
        problems.append(Problem(path, None, f"... and {extra} more bad lines not shown"))
    return problems
