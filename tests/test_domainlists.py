"""Tests for milter.domainlists: loading category lists, matching hosts, and reporting bad lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from milter.domainlists import MAX_PROBLEMS_PER_FILE, DomainLists, DomainMatch
from milter.errors import RulesError

EXAMPLE_RULES = Path(__file__).resolve().parent.parent / "rules" / "domains"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_one(tmp_path: Path, text: str, name: str = "adult.txt") -> DomainLists:
    write(tmp_path, name, text)
    return DomainLists.load(tmp_path)


def problems_of(tmp_path: Path) -> list[tuple[str, int | None, str]]:
    with pytest.raises(RulesError) as caught:
        DomainLists.load(tmp_path)
    return [(p.file.name, p.line, p.reason) for p in caught.value.problems]


# --- matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "matched"),
    [
        ("porn.example", "porn.example"),
        ("www.porn.example", "porn.example"),
        ("a.b.cdn.porn.example", "porn.example"),
        ("WWW.PORN.EXAMPLE.", "porn.example"),
        ("notporn.example", None),  # shares a suffix of characters, not of labels
        ("porn.example.redborne.test", None),  # the listed name in the middle
        ("example", None),
        ("porn.examples", None),
        ("", None),
        ("not a host", None),
    ],
)
def test_match_covers_subdomains_only(tmp_path: Path, host: str, matched: str | None) -> None:
    lists = load_one(tmp_path, "porn.example\n")
    result = lists.match(host)
    assert result == (DomainMatch(matched, "adult") if matched else None)


def test_match_prefers_most_specific_entry(tmp_path: Path) -> None:
    write(tmp_path, "adult.txt", "example.com\n")
    write(tmp_path, "malware.txt", "bad.cdn.example.com\n")
    lists = DomainLists.load(tmp_path)
    assert lists.match("x.bad.cdn.example.com") == DomainMatch("bad.cdn.example.com", "malware")
    assert lists.match("good.cdn.example.com") == DomainMatch("example.com", "adult")


def test_comments_blank_lines_and_odd_whitespace(tmp_path: Path) -> None:
    text = (
        "\ufeff# header comment\r\n"
        "\r\n"
        "   first.example   \r\n"
        "second.example  # an inline comment\r\n"
        "\t# indented comment\r\n"
        "#commented-out.example\r\n"
        "third.example"  # no final newline
    )
    lists = load_one(tmp_path, text)
    assert len(lists) == 3
    for host in ("first.example", "second.example", "third.example"):
        assert lists.match(host) == DomainMatch(host, "adult")
    assert lists.match("commented-out.example") is None


@pytest.mark.parametrize(
    "entry", ["*.wild.example", ".wild.example", "wild.example", "WILD.Example.", "*.WILD.example."]
)
def test_wildcard_and_dot_prefixes_mean_the_bare_domain(tmp_path: Path, entry: str) -> None:
    lists = load_one(tmp_path, entry + "\n")
    assert lists.match("wild.example") == DomainMatch("wild.example", "adult")
    assert lists.match("deep.sub.wild.example") == DomainMatch("wild.example", "adult")
    assert lists.match("unwild.example") is None


@pytest.mark.parametrize(
    ("entry", "host"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "bücher.example"),
        ("XN--BCHER-KVA.example", "www.BÜCHER.example"),
        ("*.bücher.example", "shop.xn--bcher-kva.example"),
        ("faß.de", "xn--fa-hia.de"),
    ],
)
def test_idn_entries_and_punycode_hosts_match_each_other(tmp_path: Path, entry: str, host: str) -> None:
    lists = load_one(tmp_path, entry + "\n")
    match = lists.match(host)
    assert match is not None
    assert match.domain.startswith("xn--")  # reported in the canonical punycode form


def test_idn_does_not_collapse_distinct_names(tmp_path: Path) -> None:
    # UTS 46 non-transitional: "faß.de" and "fass.de" are different sites.
    lists = load_one(tmp_path, "faß.de\n")
    assert lists.match("fass.de") is None


def test_ip_entries_match_exactly(tmp_path: Path) -> None:
    lists = load_one(tmp_path, "192.0.2.10\n2001:DB8::1\n", name="malware.txt")
    assert lists.match("192.0.2.10") == DomainMatch("192.0.2.10", "malware")
    assert lists.match("2001:db8:0::1") == DomainMatch("2001:db8::1", "malware")
    assert lists.match("192.0.2.1") is None
    assert lists.match("0.2.10") is None


def test_platform_domains_are_allowed(tmp_path: Path) -> None:
    # github.io is a public suffix only in the PSL's private section: blocking
    # a whole platform can be deliberate, so it is accepted.
    lists = load_one(tmp_path, "github.io\n", name="hacking.txt")
    assert lists.match("tools.github.io") == DomainMatch("github.io", "hacking")


# --- several files ----------------------------------------------------------------


def test_each_file_is_a_category(tmp_path: Path) -> None:
    write(tmp_path, "malware.txt", "malware-download.example\nshared.example\n")
    write(tmp_path, "adult.txt", "porn.example\nshared.example\n")
    write(tmp_path, "hate.txt", "# nothing yet\n")
    write(tmp_path, "README.md", "not a list: https://ignored.example/\n")
    write(tmp_path, "notes.csv", "also,ignored\n")
    lists = DomainLists.load(tmp_path)
    assert lists.categories() == ["adult", "hate", "malware"]
    assert len(lists) == 3  # distinct domains
    assert lists.match("x.porn.example") == DomainMatch("porn.example", "adult")
    assert lists.match("malware-download.example") == DomainMatch("malware-download.example", "malware")
    # in two lists: the first by file name is reported
    assert lists.match("shared.example") == DomainMatch("shared.example", "adult")


def test_empty_directory_is_empty_lists(tmp_path: Path) -> None:
    lists = DomainLists.load(tmp_path)
    assert len(lists) == 0
    assert lists.categories() == []
    assert lists.match("porn.example") is None


def test_example_rules_load_and_block_what_they_say() -> None:
    lists = DomainLists.load(EXAMPLE_RULES)
    assert {"adult", "hate", "malware"} <= set(lists.categories())
    assert lists.match("www.adult-example.test") == DomainMatch("adult-example.test", "adult")
    assert lists.match("hate-site.example") == DomainMatch("hate-site.example", "hate")
    assert lists.match("dl.malware-download.example") == DomainMatch("malware-download.example", "malware")
    assert lists.match("www.redborne.example") is None  # the school's own domain


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "reason_part"),
    [
        ("https://porn.example/", "is a URL"),
        ("HTTP://porn.example", "is a URL"),
        ("ftp://user@porn.example", "is a URL"),
        ("porn.example/videos", "has a path"),
        ("porn.example\\videos", "has a path"),
        ("porn.example:8080", "has a port"),
        ("someone@porn.example", "email address"),
        ("0.0.0.0 porn.example", "hosts-file format"),
        ("127.0.0.1\tporn.example", "hosts-file format"),
        ("porn.example adult", "spaces"),
        ("porn..example", "not a valid domain name"),
        ("porn_*.example", "not a valid domain name"),
        ("*porn.example", "not a valid domain name"),
        ("-", "not a valid domain name"),
        ("xn--zz.example", "not a valid domain name"),
        ("a" * 64 + ".example", "not a valid domain name"),
        ("com", "single name"),
        ("localhost", "single name"),
        ("*.com", "single name"),
        ("co.uk", "public suffix"),
        ("*.co.uk", "public suffix"),
        ("ac.uk", "public suffix"),
        ("sch.uk", "public suffix"),
        ("beds.sch.uk", "public suffix"),
        ("CO.UK.", "public suffix"),
    ],
)
def test_each_kind_of_bad_line_is_reported(tmp_path: Path, entry: str, reason_part: str) -> None:
    write(tmp_path, "adult.txt", f"# header\nok.example\n{entry}\nalso-ok.example\n")
    problems = problems_of(tmp_path)
    assert len(problems) == 1
    file, line, reason = problems[0]
    assert (file, line) == ("adult.txt", 3)
    assert reason_part in reason
    assert repr(entry.strip()) in reason or entry in reason  # quotes the line so it can be found


def test_every_bad_line_in_every_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path, "adult.txt", "good.example\nhttps://bad.example/\n\nco.uk\n")
    write(tmp_path, "hate.txt", "fine.example\nbad example\n")
    write(tmp_path, "malware.txt", "clean.example\n")
    problems = problems_of(tmp_path)
    assert [(file, line) for file, line, _ in problems] == [
        ("adult.txt", 2),
        ("adult.txt", 4),
        ("hate.txt", 2),
    ]


def test_problem_str_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path, "adult.txt", "ok.example\nco.uk\n")
    with pytest.raises(RulesError) as caught:
        DomainLists.load(tmp_path)
    assert f"{tmp_path / 'adult.txt'}:2: " in str(caught.value)


@pytest.mark.parametrize("name", ["Adult.txt", "adult sites.txt", "_hidden.txt", "é.txt"])
def test_bad_category_file_name(tmp_path: Path, name: str) -> None:
    write(tmp_path, name, "porn.example\n")
    problems = problems_of(tmp_path)
    assert len(problems) == 1
    assert problems[0][0] == name and problems[0][1] is None
    assert "category name" in problems[0][2]


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "adult.txt").write_bytes(b"ok.example\nalso.example\nbad\xe9.example\n")
    assert problems_of(tmp_path) == [("adult.txt", 3, "not UTF-8 text; save the file as UTF-8")]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RulesError) as caught:
        DomainLists.load(tmp_path / "nope")
    [problem] = caught.value.problems
    assert problem.file == tmp_path / "nope"
    assert "not found" in problem.reason


def test_problems_are_capped_per_file_with_a_count(tmp_path: Path) -> None:
    bad = MAX_PROBLEMS_PER_FILE + 25
    write(tmp_path, "malware.txt", "".join(f"0.0.0.0 site{i}.example\n" for i in range(bad)))
    write(tmp_path, "adult.txt", "https://one.example/\n")
    problems = problems_of(tmp_path)
    malware = [p for p in problems if p[0] == "malware.txt"]
    assert len(malware) == MAX_PROBLEMS_PER_FILE + 1
    assert malware[-1][1] is None and "25 more" in malware[-1][2]
    assert malware[MAX_PROBLEMS_PER_FILE - 1][1] == MAX_PROBLEMS_PER_FILE  # line numbers run on
    assert ("adult.txt", 1) in [(p[0], p[1]) for p in problems]  # other files still reported


# --- size -----------------------------------------------------------------------


def test_large_list_loads_linearly_and_looks_up_fast(tmp_path: Path) -> None:
    count = 200_000
    write(tmp_path, "malware.txt", "".join(f"host{i}.bad{i % 977}.example.com\n" for i in range(count)))
    start = time.perf_counter()
    lists = DomainLists.load(tmp_path)
    load_seconds = time.perf_counter() - start
    assert len(lists) == count
    # About 0.7 s here (3.3 s for a million lines); generous for a busy CI machine.
    assert load_seconds < 5, f"loading {count} lines took {load_seconds:.1f} s"
    start = time.perf_counter()
    for _ in range(10_000):
        lists.match("a.b.c.host7.bad7.example.com")
        lists.match("a.b.c.d.e.f.not-listed.example.org")
    per_lookup = (time.perf_counter() - start) / 20_000
    assert lists.match("x.host7.bad7.example.com") == DomainMatch("host7.bad7.example.com", "malware")
    assert per_lookup < 50e-6, f"lookup took {per_lookup * 1e6:.1f} µs"
