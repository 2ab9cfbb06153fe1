"""Guidance to senders: the plain-words explanation of a refusal, rendered from rules/guidance templates.

It says what was found (category and masked evidence, never the offending text), which
clause, how to fix it, the reference, and how to ask for a review.
"""

from __future__ import annotations

from milter.context import Context
from milter.policy.loader import Rules
from milter.verdict import Verdict


def render_guidance(verdict: Verdict, ctx: Context, rules: Rules, html: bool = False) -> str:
    """One text (or HTML) body covering every guidance template the verdict names."""
    school = rules.policy.school
    findings = [
        {
            **f.as_dict(),
            "clause_title": rules.clause(f.clause).title,
            "clause_text": rules.clause(f.clause).text,
        }
        for f in verdict.findings
    ]
    variables = {
        "reference": verdict.reference,
        "action": verdict.action.value,
        "sender": ctx.sender or "",
        "school": school.name,
        "review_address": school.review_address or "",
        "findings": findings,
        "clauses": [rules.clause(c) for c in verdict.clauses],
    }
    suffix = "html" if html else "txt"
    parts = []
    for name in verdict.guidance:
        template = rules.templates.get_template(f"{name}.{suffix}")
        mine = [f for f in findings if f["detector"] == name or f["category"] == name]
        parts.append(template.render(**variables, these=mine or findings))
    return "\n".join(parts)
