"""decide(): findings + context + rules -> one Verdict, through the declarative table in policy.yaml.

Each finding takes the action of the first rule in `actions` that matches it; the
message gets the strongest of those actions (see schema.PRECEDENCE). A check that
could not run turns into a temporary failure unless the rules declare it fail-open.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from milter.context import Context
from milter.findings import Finding
from milter.policy.loader import Rules
from milter.policy.schema import PRECEDENCE, Action, ActionRule
from milter.reference import new_reference
from milter.verdict import SmtpReply, Verdict

DEFAULT_REJECT_TEXT = (
    "Message refused under {clause} of the {school} Electronic Communications Policy: "
    "{summary}. Reference {reference}."
)
TEMPFAIL_TEXT = (
    "Temporary problem while checking this message; please try again later. Reference {reference}."
)


def rule_for(finding: Finding, ctx: Context, rules: Rules) -> ActionRule:
    for rule in rules.policy.actions:
        if rule.detector is not None and finding.detector not in rule.detector:
            continue
        if rule.category is not None and finding.category not in rule.category:
            continue
        if rule.direction is not None and ctx.direction not in rule.direction:
            continue
        if rule.sender_role is not None and ctx.sender_role not in rule.sender_role:
            continue
        if finding.severity < rule.min_severity:
            continue
        return rule
    # The schema makes the last rule match everything, so this is unreachable with loaded rules.
    raise LookupError("no action rule matches")


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def clause_label(clauses: Sequence[str]) -> str:
    """'clause 5.5', 'clauses 5.5 and 1.2', 'Appendix 1', 'clause 5.5 and Appendix 1'."""
    numbered = [c for c in clauses if c != "appendix"]
    parts = []
    if numbered:
        parts.append(("clause " if len(numbered) == 1 else "clauses ") + " and ".join(numbered))
    if "appendix" in clauses:
        parts.append("Appendix 1")
    return " and ".join(parts)


def decide(
    findings: Sequence[Finding],
    ctx: Context,
    rules: Rules,
    failed_checks: Sequence[str] = (),
    reference: str | None = None,
) -> Verdict:
    policy = rules.policy
    reference = reference or new_reference(policy.reference_prefix)
    matched = [(f, rule_for(f, ctx, rules)) for f in findings]

    action = Action.ACCEPT
    for _, rule in matched:
        if PRECEDENCE[rule.action] > PRECEDENCE[action]:
            action = rule.action
    blocking_failures = [
        name
        for name in failed_checks
        if policy.on_failure.detectors.get(name, policy.on_failure.default) == "tempfail"
    ]
    if blocking_failures and PRECEDENCE[Action.TEMPFAIL] > PRECEDENCE[action]:
        action = Action.TEMPFAIL
    held_instead = action == Action.REJECT and any(r.no_bounce for _, r in matched)
    if held_instead:
        action = Action.QUARANTINE

    # The findings that decided: those whose own rule asked for the final action.
    deciding = [(f, r) for f, r in matched if r.action == (Action.REJECT if held_instead else action)]
    acting = [(f, r) for f, r in matched if r.action != Action.ACCEPT]
    clauses = _unique(f.clause for f, _ in sorted(acting, key=lambda fr: -PRECEDENCE[fr[1].action]))

    reply = None
    if action == Action.REJECT:
        worst, rule = max(deciding, key=lambda fr: fr[0].severity)
        text = (rule.reply or DEFAULT_REJECT_TEXT).format(
            clause=clause_label(_unique(f.clause for f, _ in deciding)),
            summary=worst.summary,
            reference=reference,
            school=policy.school.name,
        )
        reply = SmtpReply(550, "5.7.1", text)
    elif action == Action.TEMPFAIL:
        reply = SmtpReply(451, "4.3.0", TEMPFAIL_TEXT.format(reference=reference))

    headers = [(policy.headers.verdict, f"{action.value}; ref={reference}; direction={ctx.direction.value}")]
    if acting:
        summary = ", ".join(_unique(f"{f.detector}/{f.category} ({f.clause})" for f, _ in acting))
        headers.append((policy.headers.findings, summary))

    prefixes = [r.subject_prefix for _, r in acting if r.subject_prefix]
    guidance: tuple[str, ...] = ()
    # Guidance mail only goes to senders the school can trust: never backscatter to outsiders.
    if ctx.sender_trusted and action in (Action.REJECT, Action.FIX):
        guidance = _unique(r.guidance for _, r in deciding if r.guidance)

    return Verdict(
        action=action,
        reference=reference,
        findings=tuple(findings),
        direction=ctx.direction,
        sender_role=ctx.sender_role,
        clauses=clauses,
        reply=reply,
        headers=tuple(headers),
        result_header_names=(policy.headers.verdict, policy.headers.findings),
        fix_recipients=any(f.detector == "missing_bcc" and r.action == Action.FIX for f, r in matched),
        subject_prefix=prefixes[0] if prefixes else None,
        guidance=guidance,
        alerts=_unique(role for _, r in matched for role in r.alert),
        failed_checks=tuple(failed_checks),
    )
