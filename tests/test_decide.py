"""decide() and the engine around it: precedence, failures, trust, headers and guidance."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from milter import engine
from milter.context import Context
from milter.decide import clause_label, decide
from milter.engine import scan
from milter.envelope import Envelope
from milter.findings import Finding, Severity
from milter.guidance import render_guidance
from milter.policy.loader import Rules, load_rules
from milter.policy.schema import Action, Direction, Role
from tests.conftest import copy_rules
from tests.mail import build

OUTBOUND = Context(
    Direction.OUTBOUND, Role.STAFF, "j.hughes@redborne.example", True, ("x@elsewhere.example",)
)
INBOUND = Context(
    Direction.INBOUND, Role.EXTERNAL, "x@elsewhere.example", False, ("j.hughes@redborne.example",)
)


def finding(
    detector: str, category: str, severity: Severity = Severity.STRONG, clause: str = "5.5"
) -> Finding:
    return Finding(detector, category, severity, clause, f"{category} found", ("e***",))


def test_strongest_action_wins_and_clauses_listed(rules: Rules) -> None:
    findings = [
        finding("shouting", "shouting", Severity.MILD, "appendix"),
        finding("missing_bcc", "missing_bcc", clause="appendix"),
        finding("obscene_language", "profanity"),
    ]
    verdict = decide(findings, OUTBOUND, rules)
    assert verdict.action is Action.REJECT
    assert verdict.reply is not None and verdict.reply.code == 550 and verdict.reply.enhanced == "5.7.1"
    assert verdict.reference in verdict.reply.text
    assert "clause 5.5 and Appendix 1" in verdict.reply.text
    assert set(verdict.clauses) == {"5.5", "appendix"}
    assert set(verdict.guidance) == {"missing_bcc", "obscene_language"}
    assert verdict.subject_prefix == "[Shouting] "


def test_no_findings_accept_with_result_header(rules: Rules) -> None:
    verdict = decide([], OUTBOUND, rules)
    assert verdict.action is Action.ACCEPT and verdict.reply is None and not verdict.clauses
    (name, value), *_ = verdict.headers
    assert name == "X-School-Policy" and value.startswith("accept; ref=RB-")


def test_failed_check_tempfails_unless_fail_open(rules: Rules) -> None:
    verdict = decide([], OUTBOUND, rules, failed_checks=["obscene_language"])
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and verdict.reply.code == 451 and verdict.reference in verdict.reply.text
    # policy.yaml declares advertising fail-open: it may not delay mail.
    assert decide([], OUTBOUND, rules, failed_checks=["advertising"]).action is Action.ACCEPT
    # A known reject stays a reject: retrying would not change it.
    rejected = decide([finding("obscene_language", "profanity")], OUTBOUND, rules, ["safeguarding_concern"])
    assert rejected.action is Action.REJECT


def test_no_guidance_to_untrusted_sender(rules: Rules) -> None:
    untrusted = dataclasses.replace(OUTBOUND, sender_trusted=False)
    verdict = decide([finding("missing_bcc", "missing_bcc", clause="appendix")], untrusted, rules)
    assert verdict.action is Action.REJECT and verdict.guidance == ()


def test_clause_label() -> None:
    assert clause_label(["5.5"]) == "clause 5.5"
    assert clause_label(["5.5", "1.2"]) == "clauses 5.5 and 1.2"
    assert clause_label(["appendix"]) == "Appendix 1"


def test_engine_turns_a_crashing_detector_into_tempfail(
    rules: Rules, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> list[Finding]:
        raise RuntimeError("secret message text must not be logged")

    checks = [(n, broken if n == "obscene_language" else c) for n, c in engine.active(rules)]
    monkeypatch.setattr(engine, "active", lambda _rules: checks)
    result = scan(build(), Envelope(), rules)
    assert result.verdict.action is Action.TEMPFAIL
    assert result.verdict.failed_checks == ("obscene_language",)


def test_guidance_renders_for_every_guidance_template(rules: Rules) -> None:
    names = sorted({r.guidance for r in rules.policy.actions if r.guidance})
    assert names, "the example rules name guidance templates"
    for name in names:
        rule = next(r for r in rules.policy.actions if r.guidance == name)
        detector = rule.detector[0] if rule.detector else name
        category = rule.category[0] if rule.category else detector
        verdict = decide([finding(detector, category, Severity.SEVERE)], OUTBOUND, rules)
        assert name in verdict.guidance
        text = render_guidance(verdict, OUTBOUND, rules)
        assert verdict.reference in text and "How to fix it" in text
        assert "e***" in text  # masked evidence, as found


def test_missing_bcc_without_directory_counts_external(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    copy_rules(root)
    policy = root / "policy.yaml"
    policy.write_text(policy.read_text().replace("  directory: directory.csv\n", ""))
    rules = load_rules(root)
    assert any("no directory" in w for w in rules.warnings)
    outsiders = [f"p{i}@gmail.example" for i in range(3)]
    verdict = scan(build(to=outsiders), Envelope(), rules).verdict
    assert verdict.action is Action.REJECT
    assert [f.detector for f in verdict.findings] == ["missing_bcc"]
    assert "3 external addresses" in verdict.findings[0].summary
