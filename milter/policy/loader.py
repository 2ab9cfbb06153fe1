"""Load and check a whole rules/ directory into one immutable Rules object.

Every problem in every file is collected and reported together, each with file, line
and reason, so a school fixes its rules in one pass. A Rules object is built once and
shared; building it (lexicon automata, domain sets) is the expensive part.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jinja2
from pydantic import ValidationError

from milter.clamd import ClamdConfigError, limit_warnings, read_clamd_limits
from milter.detectors.advertising import AdvertisingPhrases
from milter.detectors.safeguarding_concern import SafeguardingLexicon
from milter.domainlists import DomainLists
from milter.errors import Problem, RulesError
from milter.lexicon import Lexicon, load_allowlist, load_terms
from milter.policy.directory import Directory
from milter.policy.schema import PolicyFile
from milter.policy.yamlpos import line_for, load_yaml_with_lines

POLICY_FILE = "policy.yaml"
CLAUSES_FILE = "clauses.yaml"
GUIDANCE_DIR = "guidance"


@dataclass(frozen=True)
class Clause:
    number: str
    title: str
    text: str


@dataclass(frozen=True)
class Rules:
    """Everything the engine needs from rules/, checked and ready to use."""

    root: Path
    policy: PolicyFile
    clauses: dict[str, Clause]
    directory: Directory | None
    obscene: Lexicon
    safeguarding: SafeguardingLexicon
    domains: DomainLists
    advertising: AdvertisingPhrases
    templates: jinja2.Environment
    warnings: tuple[str, ...] = field(default=())

    def clause(self, number: str) -> Clause:
        return self.clauses.get(number, Clause(number, number, ""))


def _validation_problems(path: Path, lines: dict[Any, int], exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        where = ".".join(str(p) for p in loc) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        problems.append(Problem(path, line_for(lines, loc), f"{where}: {message}"))
    return problems


def _load_policy(root: Path) -> PolicyFile:
    path = root / POLICY_FILE
    if not path.is_file():
        raise RulesError([Problem(path, None, "missing: every rules directory needs a policy.yaml")])
    data, lines = load_yaml_with_lines(path)
    if not isinstance(data, dict):
        raise RulesError(
            [Problem(path, 1, "the file must be a mapping with at least 'school' and 'actions'")]
        )
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as exc:
        raise RulesError(_validation_problems(path, lines, exc)) from None


def _load_clauses(root: Path) -> dict[str, Clause]:
    path = root / CLAUSES_FILE
    data, lines = load_yaml_with_lines(path) if path.is_file() else ({}, {})
    if not isinstance(data, dict):
        raise RulesError([Problem(path, 1, "must map each clause number to a title and text")])
    clauses: dict[str, Clause] = {}
    problems: list[Problem] = []
    for number, body in data.items():
        if not isinstance(body, dict) or not isinstance(body.get("title"), str):
            problems.append(Problem(path, lines.get((str(number),)), f"clause {number}: needs a 'title'"))
            continue
        clauses[str(number)] = Clause(str(number), body["title"], str(body.get("text", "")).strip())
    if problems:
        raise RulesError(problems)
    return clauses


def _read_templates(root: Path) -> tuple[dict[str, str], list[Problem]]:
    """Every template under guidance/, read now, by the names FileSystemLoader would give them.

    The rules in force render what was loaded and checked: a template deleted or edited on
    disk afterwards changes nothing until the next load, which checks it first.
    """
    folder = root / GUIDANCE_DIR
    sources: dict[str, str] = {}
    problems: list[Problem] = []
    if not folder.is_dir():
        return sources, problems
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        # Hidden files (an editor's .name.swp) are no templates, and may be half written.
        if not path.is_file() or any(part.startswith(".") for part in name.split("/")):
            continue
        try:
            sources[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(path, None, f"template error: not UTF-8 text (byte {exc.start})"))
        except OSError as exc:
            problems.append(Problem(path, None, f"template cannot be read: {exc.strerror or exc}"))
    return sources, problems


def _template_environment(sources: dict[str, str]) -> jinja2.Environment:
    return jinja2.Environment(
        # From memory, never from disk: see _read_templates. A read-only view, as Rules is frozen.
        loader=jinja2.DictLoader(MappingProxyType(dict(sources))),
        undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _check_templates(
    root: Path,
    env: jinja2.Environment,
    sources: dict[str, str],
    unreadable: list[Problem],
    policy: PolicyFile,
) -> list[Problem]:
    problems = list(unreadable)
    named = {p.file for p in unreadable}
    policy_path = root / POLICY_FILE
    for name in sorted({r.guidance for r in policy.actions if r.guidance}):
        for suffix in ("txt", "html"):
            path = root / GUIDANCE_DIR / f"{name}.{suffix}"
            # What was read, not what is on disk now: the file may have gone since.
            if f"{name}.{suffix}" not in sources and path not in named:
                problems.append(Problem(policy_path, None, f"guidance {name!r} has no template {path}"))
    for name in sorted(sources):
        try:
            env.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            problems.append(Problem(root / GUIDANCE_DIR / name, exc.lineno, f"template error: {exc.message}"))
    return problems


def _check_references(root: Path, policy: PolicyFile, clauses: dict[str, Clause]) -> list[Problem]:
    problems: list[Problem] = []
    path = root / POLICY_FILE
    used = set()
    for name, settings in policy.detectors:
        for attr in ("clause", "clause_received"):
            if hasattr(settings, attr):
                used.add((name, getattr(settings, attr)))
        for number in getattr(settings, "category_clauses", {}).values():
            used.add((name, number))
    for detector, number in sorted(used):
        if number not in clauses:
            problems.append(
                Problem(path, None, f"detectors.{detector}: clause {number!r} is not in {CLAUSES_FILE}")
            )
    contacts = policy.school.contacts
    digest = policy.notifications.quarantine_digest
    if digest and digest not in contacts:
        problems.append(
            Problem(path, None, f"notifications.quarantine_digest: {digest!r} is not in school.contacts")
        )
    for role in policy.notifications.digest_roles:
        if role not in contacts:
            problems.append(
                Problem(path, None, f"notifications.digest_roles: {role!r} is not in school.contacts")
            )
    for i, rule in enumerate(policy.actions):
        for role in rule.alert:
            if role not in contacts:
                problems.append(
                    Problem(path, None, f"actions[{i}]: alert role {role!r} is not in school.contacts")
                )
    return problems


def postfix_message_size_limit() -> int | None:
    """The local Postfix's message_size_limit, when Postfix is installed here."""
    # /usr/sbin is not on every PATH (cron, some service managers).
    postconf = shutil.which("postconf") or shutil.which("postconf", path="/usr/sbin")
    if not postconf:
        return None
    try:
        command = [postconf, "-h", "message_size_limit"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return int(value) if out.returncode == 0 and value.isdigit() else None


def scanner_limit_warnings(policy: PolicyFile) -> list[str]:
    """Where clamd, Postfix and the gateway disagree on sizes, so large mail would go unscanned."""
    settings = policy.detectors.virus_scan
    if not settings.enabled:
        return []
    warnings: list[str] = []
    limit = int(settings.max_stream)
    postfix = postfix_message_size_limit()
    if postfix is not None and (postfix == 0 or postfix > limit):
        shown = "no limit" if postfix == 0 else f"{postfix} bytes"
        warnings.append(
            f"Postfix's message_size_limit is {shown} but virus_scan.max_stream is {limit}: "
            "larger messages are not virus-scanned"
        )
    if settings.clamd_conf:
        conf = Path(settings.clamd_conf)
        if not conf.is_file():
            warnings.append(f"virus_scan.clamd_conf {conf} not found: clamd's size limits were not checked")
        else:
            try:
                limits = read_clamd_limits(conf)
            except (ClamdConfigError, OSError) as exc:
                warnings.append(f"cannot read clamd's limits: {exc}")
            else:
                warnings.extend(limit_warnings(limits, max(limit, postfix or 0)))
    return warnings


def load_rules(root: Path) -> Rules:
    """Load rules/; raise RulesError listing every problem found."""
    root = root.resolve()
    if not root.is_dir():
        raise RulesError([Problem(root, None, "not a directory")])
    policy = _load_policy(root)
    problems: list[Problem] = []
    warnings: list[str] = []

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except RulesError as exc:
            problems.extend(exc.problems)
            return None

    clauses = attempt(_load_clauses, root) or {}
    directory = None
    if policy.school.directory:
        directory = attempt(Directory.load, root / policy.school.directory)
    else:
        warnings.append("no directory configured: missing_bcc counts external addresses instead of parents")

    settings = policy.detectors
    terms = attempt(load_terms, root / settings.obscene_language.lexicon) or []
    allow: list[str] = []
    for name in settings.obscene_language.allowlist:
        allow.extend(attempt(load_allowlist, root / name) or [])
    safeguarding = attempt(SafeguardingLexicon.load, root / settings.safeguarding_concern.lexicon)
    domains = attempt(DomainLists.load, root / settings.offensive_links.domain_lists)
    advertising = attempt(AdvertisingPhrases.load, root / settings.advertising.phrases)
    sources, unreadable = _read_templates(root)
    templates = _template_environment(sources)
    problems.extend(_check_templates(root, templates, sources, unreadable, policy))
    problems.extend(_check_references(root, policy, clauses))
    if problems:
        raise RulesError(problems)
    warnings.extend(scanner_limit_warnings(policy))
    return Rules(
        root=root,
        policy=policy,
        clauses=clauses,
        directory=directory,
        obscene=Lexicon(terms, allow),
        safeguarding=safeguarding,
        domains=domains,
        advertising=advertising,
        templates=templates,
        warnings=tuple(warnings),
    )
