"""check-rules and load_rules: a broken rules file is named with its line and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from milter.cli import main
from milter.context import Context
from milter.errors import RulesError
from milter.findings import Finding, Severity
from milter.notify import guidance_message
from milter.policy.loader import Rules, load_rules
from milter.policy.schema import Action, Direction, Role
from milter.verdict import Verdict
from tests.conftest import REPO


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(REPO / "rules", target)
    return target


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(needle)


def problems(root: Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(root)
    return [str(p) for p in info.value.problems]


def test_example_rules_load(rules_copy: Path) -> None:
    rules = load_rules(rules_copy)
    assert rules.policy.school.name == "Redborne Upper School"
    assert len(rules.obscene) > 1000
    assert rules.directory is not None and len(rules.directory) >= 15


def test_unknown_action_names_file_line_and_choices(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(
        policy,
        "    action: reject\n    guidance: missing_bcc",
        "    action: bounce\n    guidance: missing_bcc",
    )
    found = problems(rules_copy)
    assert len(found) == 1
    expected_line = line_of(policy, "action: bounce")
    assert found[0].startswith(f"{policy}:{expected_line}: ")
    assert "bounce" in found[0] or "accept" in found[0]


def test_yaml_syntax_error_has_line(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(policy, "  name: Redborne Upper School", "  name: [Redborne Upper School")
    (found,) = problems(rules_copy)
    assert found.startswith(f"{policy}:") and "not valid YAML" in found
    # The typo's own line is named, either as the error line or as where the construct began.
    typo = line_of(policy, "name: [Redborne")
    assert found.startswith(f"{policy}:{typo}:") or f"started on line {typo})" in found


def test_unknown_key_is_refused_with_line(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(policy, "    max_visible_parents: 2", "    max_visible_parent: 2")
    (found,) = problems(rules_copy)
    assert found.startswith(f"{policy}:{line_of(policy, 'max_visible_parent: 2')}: ")
    assert "max_visible_parent" in found and "not permitted" in found


def test_bad_size_and_bad_network(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(policy, "max_total: 100MB", "max_total: lots")
    edit(policy, "10.20.0.0/16", "10.20.0.0/33")
    found = problems(rules_copy)
    assert any(f":{line_of(policy, 'max_total: lots')}:" in p and "max_total" in p for p in found)
    assert any(f":{line_of(policy, '10.20.0.0/33')}:" in p and "trusted_networks" in p for p in found)


def test_last_rule_must_catch_everything(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(policy, "  - action: accept\n", "  - action: accept\n    detector: shouting\n")
    (found,) = problems(rules_copy)
    assert "last rule" in found


def test_directory_bad_role_names_csv_line(rules_copy: Path) -> None:
    directory = rules_copy / "directory.csv"
    edit(directory, "tom.green@gmail.example,parent", "tom.green@gmail.example,guardian")
    (found,) = problems(rules_copy)
    assert found.startswith(f"{directory}:{line_of(directory, 'guardian')}: ")
    assert "guardian" in found


def test_lexicon_bad_severity_names_line(rules_copy: Path) -> None:
    lexicon = rules_copy / "lexicon" / "safeguarding.tsv"
    with lexicon.open("a") as handle:
        handle.write("go away\tbullying\tterrible\n")
    (found,) = problems(rules_copy)
    assert found.startswith(f"{lexicon}:{len(lexicon.read_text().splitlines())}: ")
    assert "terrible" in found


def test_template_syntax_error_and_missing_template(rules_copy: Path) -> None:
    template = rules_copy / "guidance" / "bulk_weight.txt"
    template.write_text("line one\n{% if %}\n")
    (rules_copy / "guidance" / "advertising.txt").unlink()
    found = problems(rules_copy)
    assert any(p.startswith(f"{template}:2: template error") for p in found)
    assert any("guidance 'advertising' has no template" in p for p in found)


def obscene_guidance_text(rules: Rules) -> str:
    """The text part of the guidance mail a staff sender gets for obscene language."""
    staff = "j.hughes@redborne.example"
    finding = Finding("obscene_language", "profanity", Severity.STRONG, "5.5", "strong profanity", ("f***",))
    verdict = Verdict(
        action=Action.REJECT,
        reference="RB-7KQ2-M9XD",
        findings=(finding,),
        direction=Direction.OUTBOUND,
        sender_role=Role.STAFF,
        clauses=("5.5",),
        guidance=("obscene_language",),
    )
    ctx = Context(Direction.OUTBOUND, Role.STAFF, staff, True, ("supplier@sportsgear.example",))
    msg = guidance_message(verdict, ctx, rules, sender=staff)
    assert msg is not None
    text = msg.get_body(("plain",))
    assert text is not None
    return str(text.get_content())


def test_loaded_rules_keep_their_guidance_templates_until_the_next_load(rules_copy: Path) -> None:
    rules = load_rules(rules_copy)
    before = obscene_guidance_text(rules)
    assert "Your message could not be delivered." in before and "send a revised version" in before

    # After the load, a template goes and another is edited: the rules in force do not notice.
    template = rules_copy / "guidance" / "obscene_language.txt"
    saved = template.read_text()
    template.unlink()
    edit(rules_copy / "guidance" / "_header.txt", "could not be delivered.", "EDITED ON DISK.")
    assert obscene_guidance_text(rules) == before

    # A new load (SIGHUP) is refused for the missing one, so the loaded rules stay in force.
    assert any("guidance 'obscene_language' has no template" in p for p in problems(rules_copy))
    # Once it is back, a new load has the edit; the rules loaded before still do not.
    template.write_text(saved)
    assert "EDITED ON DISK." in obscene_guidance_text(load_rules(rules_copy))
    assert obscene_guidance_text(rules) == before


def test_a_template_that_is_not_utf8_is_named(rules_copy: Path) -> None:
    template = rules_copy / "guidance" / "shouting.txt"
    template.write_bytes("Caf\xe9 au lait\n".encode("latin-1"))
    (found,) = problems(rules_copy)
    assert found.startswith(f"{template}: template error: not UTF-8"), found


def test_every_problem_reported_at_once(rules_copy: Path) -> None:
    edit(rules_copy / "directory.csv", "tom.green@gmail.example,parent", "not-an-address,parent")
    (rules_copy / "domains" / "adult.txt").write_text("https://porn.example/videos\n")
    found = problems(rules_copy)
    assert len(found) >= 2
    assert any("directory.csv:" in p for p in found)
    assert any("adult.txt:1:" in p for p in found)


def test_unknown_alert_role_and_clause(rules_copy: Path) -> None:
    policy = rules_copy / "policy.yaml"
    edit(policy, "alert: [it]", "alert: [caretaker]")
    edit(policy, "  shouting:\n", "  shouting:\n    clause: '9.9'\n")
    found = problems(rules_copy)
    assert any("caretaker" in p for p in found)
    assert any("'9.9'" in p for p in found)


def test_check_rules_command_exit_codes(rules_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-rules", str(rules_copy)]) == 0
    assert "OK" in capsys.readouterr().out
    edit(rules_copy / "policy.yaml", "min_subject_letters: 12", "min_subject_letters: -1")
    assert main(["check-rules", str(rules_copy)]) == 1
    err = capsys.readouterr().err
    assert "policy.yaml:" in err and "min_subject_letters" in err


def test_missing_policy_file(tmp_path: Path) -> None:
    (found,) = problems(tmp_path)
    assert "policy.yaml" in found and "missing" in found


def test_clamd_limits_below_gateway_limit_warn(rules_copy: Path, tmp_path: Path) -> None:
    conf = tmp_path / "clamd.conf"
    conf.write_text("StreamMaxLength 10M\nMaxFileSize 200M\nMaxScanSize 400M\n")
    edit(rules_copy / "policy.yaml", "clamd_conf: /etc/clamav/clamd.conf", f"clamd_conf: {conf}")
    warnings = load_rules(rules_copy).warnings
    assert any("StreamMaxLength is 10485760 bytes" in w for w in warnings)
    assert not any("MaxFileSize" in w for w in warnings)
    # The shipped clamd.conf agrees with the example rules.
    edit(rules_copy / "policy.yaml", f"clamd_conf: {conf}", f"clamd_conf: {REPO / 'deploy/clamd/clamd.conf'}")
    assert not any("clamd's" in w for w in load_rules(rules_copy).warnings)


def test_missing_clamd_conf_is_a_warning_not_an_error(rules_copy: Path) -> None:
    edit(rules_copy / "policy.yaml", "clamd_conf: /etc/clamav/clamd.conf", "clamd_conf: /nonexistent/c.conf")
    assert any("not found" in w for w in load_rules(rules_copy).warnings)
