"""`school-milter serve --check`: a real clamd, real SQLite stores, real certificate files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine

from milter.cli import main
from milter.store import Store, migrate
from tests.clamd_harness import ClamdInstance, clamd  # noqa: F401 - fixture
from tests.conftest import copy_rules
from tests.tls_certs import TestCA


@pytest.fixture
def rules_copy(tmp_path: Path) -> Iterator[Path]:
    copy_rules(tmp_path / "rules", virus_scan=True)
    yield tmp_path / "rules"


def point_at_clamd(rules: Path, address: str) -> None:
    policy = rules / "policy.yaml"
    text = policy.read_text()
    assert "clamd: unix:/run/clamav/clamd.ctl" in text
    policy.write_text(text.replace("clamd: unix:/run/clamav/clamd.ctl", f"clamd: {address}"))


def check(capsys: pytest.CaptureFixture[str], rules: Path, config: Path) -> tuple[int, list[str]]:
    code = main(["--rules", str(rules), "serve", "--config", str(config), "--check"])
    return code, capsys.readouterr().out.splitlines()


def test_a_good_setup_is_ready(
    tmp_path: Path,
    rules_copy: Path,
    clamd: ClamdInstance,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    point_at_clamd(rules_copy, clamd.unix_address)
    database = f"sqlite:///{tmp_path}/q.db"
    Store(database).close()  # a store at the newest schema
    cert = TestCA(tmp_path / "ca").issue("gateway", days=90)
    config = tmp_path / "gw.toml"
    config.write_text(
        "[gateway]\n"
        f'database = "{database}"\n'
        'smtp = "127.0.0.1:10025"\n'
        f'smtp_tls_cert = "{cert.cert}"\n'
        f'smtp_tls_key = "{cert.key}"\n'
        f'spool = "{tmp_path}/spool"\n'
        "workers = 4\n"
    )
    code, lines = check(capsys, rules_copy, config)
    assert code == 0, lines
    assert lines[0] == f"ok       config {config}"
    assert any(line.startswith(f"ok       rules {rules_copy}: ") and "action rules" in line for line in lines)
    assert "ok       milter: inet:127.0.0.1:8894, 4 worker(s)" in lines
    assert any(line.startswith(f"ok       SMTP mode TLS: {cert.cert} expires on ") for line in lines), lines
    assert any(
        line.startswith(f"ok       SMTP mode spool: {tmp_path}/spool (made at start), ") for line in lines
    )
    assert f"ok       quarantine store {database}: schema {migrate.head()}, current" in lines
    assert any(line.startswith(f"ok       clamd {clamd.unix_address}: ClamAV ") for line in lines), lines
    assert not any(line.startswith("problem") for line in lines)
    assert lines[-1] == "ready"
    assert not (tmp_path / "spool").exists(), "a check makes nothing"


def test_each_problem_is_named_and_the_answer_is_2(
    tmp_path: Path, rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = rules_copy / "policy.yaml"
    policy.write_text(policy.read_text() + "\nbroken: [\n")
    ca = TestCA(tmp_path / "ca")
    mine, other = ca.issue("gateway"), ca.issue("other")
    config = tmp_path / "gw.toml"
    config.write_text(
        "[gateway]\n"
        f'milter = "unix:{tmp_path}/no-such-dir/milter.sock"\n'
        'smtp = "127.0.0.1:10025"\n'
        f'smtp_tls_cert = "{mine.cert}"\n'
        f'smtp_tls_key = "{other.key}"\n'
        'database = ""\n'
    )
    code, lines = check(capsys, rules_copy, config)
    assert code == 2
    problems = [line for line in lines if line.startswith("problem  ")]
    assert len(problems) == 3, lines
    assert "policy.yaml" in problems[0]
    assert f"the socket's directory {tmp_path}/no-such-dir does not exist" in problems[1]
    assert f"TLS key {other.key}: does not belong to the certificate" in problems[2]
    assert lines[-1] == "3 problem(s): the gateway would not start"


@pytest.mark.parametrize("case", ["nothing to serve", "socket directory is a file"])
def test_a_milter_socket_the_start_could_not_make_is_a_problem(
    case: str, tmp_path: Path, rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.toml"
    if case == "nothing to serve":
        milter, expected = "", "nothing to serve: neither milter nor smtp is set"
    else:
        (tmp_path / "plain-file").write_text("")
        milter = f"unix:{tmp_path}/plain-file/milter.sock"
        expected = f"the socket's directory {tmp_path}/plain-file is not a directory"
    config.write_text(f'[gateway]\nmilter = "{milter}"\ndatabase = ""\n')
    code, lines = check(capsys, rules_copy, config)
    assert code == 2
    assert any(line.startswith("problem  milter: ") and expected in line for line in lines), lines


def test_what_a_start_would_do_is_said_and_nothing_is_changed(
    tmp_path: Path, rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    point_at_clamd(rules_copy, f"unix:{tmp_path}/no-clamd.sock")
    missing = tmp_path / "new" / "q.db"
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\ndatabase = "sqlite:///{missing}"\n')
    code, lines = check(capsys, rules_copy, config)
    # clamd down is a warning: the gateway starts and mail waits or is tagged per rules.
    assert code == 0, lines
    store_line = f"ok       quarantine store sqlite:///{missing}: {missing} does not exist yet"
    assert f"{store_line}: it is made at the first start" in lines
    (clamd_line,) = [line for line in lines if "clamd unix:" in line]
    assert clamd_line.startswith("warning  ") and "mail with attachments gets tempfail" in clamd_line
    assert not missing.parent.exists()

    # A store one schema behind: reported, not upgraded (the start does that).
    behind = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{behind}")
    with engine.begin() as connection:
        command.upgrade(migrate._config(connection), "0001")
    engine.dispose()
    config.write_text(f'[gateway]\ndatabase = "sqlite:///{behind}"\n')
    code, lines = check(capsys, rules_copy, config)
    assert code == 0
    assert (
        f"warning  quarantine store sqlite:///{behind}: schema 0001: "
        f"the next start upgrades it to {migrate.head()}" in lines
    )
    engine = create_engine(f"sqlite:///{behind}")
    assert migrate.current(engine) == "0001"
    engine.dispose()


def test_a_store_that_cannot_be_opened_is_a_problem_without_its_password(
    tmp_path: Path, rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.toml"
    # Nothing listens on port 1: the connection is refused at once.
    config.write_text(
        '[gateway]\ndatabase = "postgresql+psycopg://gateway:s3cret@127.0.0.1:1/school_milter"\n'
    )
    code, lines = check(capsys, rules_copy, config)
    assert code == 2
    (problem,) = [line for line in lines if line.startswith("problem  ")]
    assert problem.startswith(
        "problem  quarantine store postgresql+psycopg://gateway:***@127.0.0.1:1/school_milter: "
    )
    assert "s3cret" not in "\n".join(lines)


def test_a_spool_disk_under_spool_min_free_is_a_warning(
    tmp_path: Path, rules_copy: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gw.toml"
    config.write_text(f'[gateway]\nsmtp = "127.0.0.1:10025"\nspool = "{small_disk}"\ndatabase = ""\n')
    code, lines = check(capsys, rules_copy, config)
    assert code == 0
    spool_line = f"warning  SMTP mode spool: {small_disk}: 0 MB free, under spool_min_free (20 MB): "
    assert f"{spool_line}MAIL is answered 452 until there is room" in lines
