"""The private PostgreSQL of tests/pg_harness.py: reachable through SQLAlchemy, concurrent,
separate databases on demand, and really gone after stop()."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, inspect, make_url, text
from sqlalchemy.exc import OperationalError

from tests import pg_harness
from tests.pg_harness import (
    DEFAULT_DATABASE,
    LOOPBACK,
    PostgresHarnessError,
    PostgresInstance,
    port_open,
    postgres,  # noqa: F401  (pytest fixture)
    require_postgres,
)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines a test makes; all disposed afterwards, so no connection outlives the test."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


def make_engine(engines: list[Engine], url: str) -> Engine:
    engine = create_engine(url)
    engines.append(engine)
    return engine


def gone(pid: int) -> bool:
    """True when no process `pid` runs. The postmaster, daemonized by pg_ctl, is a child of
    init: it may linger as a zombie until init reaps it, which counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sqlalchemy_connects_to_the_test_database(postgres: PostgresInstance, engines: list[Engine]) -> None:  # noqa: F811
    url = make_url(postgres.url)
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg",
        "127.0.0.1",
        postgres.port,
        DEFAULT_DATABASE,
    )
    engine = make_engine(engines, postgres.url)
    with engine.connect() as conn:
        assert conn.execute(text("select version()")).scalar_one().startswith("PostgreSQL ")
        assert conn.execute(text("select current_database()")).scalar_one() == DEFAULT_DATABASE
        assert conn.execute(text("show server_encoding")).scalar_one() == "UTF8"
        assert conn.execute(text("show listen_addresses")).scalar_one() == LOOPBACK
        assert conn.execute(text("show fsync")).scalar_one() == "off"
        assert conn.execute(text("show max_connections")).scalar_one() == "100"


def test_the_password_is_required(postgres: PostgresInstance, engines: list[Engine]) -> None:  # noqa: F811
    wrong = make_url(postgres.url).set(password="wrong")
    with pytest.raises(OperationalError, match="password authentication failed"):
        make_engine(engines, wrong.render_as_string(hide_password=False)).connect()


def test_two_engines_write_to_one_table_concurrently(
    postgres: PostgresInstance,  # noqa: F811
    engines: list[Engine],
) -> None:
    first = make_engine(engines, postgres.url)
    second = make_engine(engines, postgres.url)
    with first.begin() as conn:
        conn.execute(text("drop table if exists harness_writes"))
        conn.execute(text("create table harness_writes (id serial primary key, writer text, n int)"))

    # A transaction of the first engine stays open while the second writes and commits:
    # PostgreSQL locks rows, not the database (SQLite would make the second wait).
    with first.connect() as open_conn:
        open_conn.execute(text("insert into harness_writes (writer, n) values ('first', -1)"))
        with second.begin() as conn:
            conn.execute(text("insert into harness_writes (writer, n) values ('second', -1)"))
        with second.connect() as conn:  # the first engine's row is not committed yet
            assert conn.execute(text("select writer from harness_writes")).scalars().all() == ["second"]
        open_conn.commit()

    # Both engines, in threads released together, each commit rows one by one.
    rows = 50
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def write(engine: Engine, writer: str) -> None:
        try:
            barrier.wait(timeout=10)
            for n in range(rows):
                with engine.begin() as conn:
                    conn.execute(
                        text("insert into harness_writes (writer, n) values (:writer, :n)"),
                        {"writer": writer, "n": n},
                    )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=pair) for pair in ((first, "first"), (second, "second"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    with first.connect() as conn:
        query = "select writer, count(*) from harness_writes where n >= 0 group by writer"
        counts = dict(conn.execute(text(query)).all())
        assert counts == {"first": rows, "second": rows}
        assert conn.execute(text("select count(*) from harness_writes where n < 0")).scalar_one() == 2


def test_fresh_database_is_empty_and_separate(postgres: PostgresInstance, engines: list[Engine]) -> None:  # noqa: F811
    main = make_engine(engines, postgres.url)
    with main.begin() as conn:
        conn.execute(text("create table if not exists only_in_main (id int)"))

    url = postgres.fresh_database("harness_store_b")
    assert make_url(url).database == "harness_store_b"
    assert make_url(url).port == postgres.port
    fresh = make_engine(engines, url)
    assert inspect(fresh).get_table_names() == []
    with fresh.begin() as conn:
        assert conn.execute(text("select current_database()")).scalar_one() == "harness_store_b"
        conn.execute(text("create table only_in_fresh (id int)"))
        conn.execute(text("insert into only_in_fresh values (1)"))
    assert "only_in_fresh" not in inspect(main).get_table_names()
    assert "only_in_main" in inspect(main).get_table_names()

    # Asked again for the same name, it is empty again; a connection still open is cut off.
    lingering = fresh.connect()
    lingering.execute(text("select 1"))
    assert postgres.fresh_database("harness_store_b") == url
    with pytest.raises(OperationalError, match="terminating connection"):
        lingering.execute(text("select 1"))
    lingering.invalidate()
    lingering.close()
    fresh.dispose()
    assert inspect(make_engine(engines, url)).get_table_names() == []


@pytest.mark.parametrize("name", ["", "postgres", "template1", "Upper", "semi;colon", "x" * 64])
def test_fresh_database_refuses_odd_names(postgres: PostgresInstance, name: str) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="database name"):
        postgres.fresh_database(name)


def test_after_stop_the_port_is_closed(tmp_path: Path) -> None:
    require_postgres()
    instance = PostgresInstance(tmp_path / "pg", dbname="stop_test")
    try:
        instance.start()
        assert instance.running
        assert port_open(LOOPBACK, instance.port)
        if os.geteuid() == 0:  # the server runs as postgres, in a directory it can reach
            assert instance.data_directory.stat().st_uid != 0
        engine = create_engine(instance.url)
        conn = engine.connect()
        assert conn.execute(text("select current_database()")).scalar_one() == "stop_test"
        conn.execute(text("create table kept (word text)"))
        conn.execute(text("insert into kept values ('still here')"))
        conn.commit()
        pid = instance.postmaster_pid()

        instance.stop()  # fast shutdown, with this session still open

        with pytest.raises(OperationalError):
            conn.execute(text("select 1"))
        conn.invalidate()
        conn.close()
        assert not instance.running
        assert pid is not None and gone(pid)
        assert instance.processes() == []
        assert not port_open(LOOPBACK, instance.port)
        engine.dispose()
        with pytest.raises(OperationalError):
            create_engine(instance.url).connect()
        instance.stop()  # twice is fine

        # A later start() brings the same cluster back, on the same port, data included.
        port = instance.port
        instance.start()
        assert instance.port == port
        with engine.connect() as conn:
            assert conn.execute(text("select word from kept")).scalar_one() == "still here"
        engine.dispose()
    finally:
        cluster = instance.cluster_directory
        instance.close()
    assert not port_open(LOOPBACK, instance.port)
    if cluster != tmp_path / "pg" / "postgres":  # a private directory: gone, its log copied
        assert not cluster.exists()
        assert "database system is shut down" in (tmp_path / "pg" / "postgres.log").read_text()


def test_missing_server_skips_unless_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_harness, "find_bindir", lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="install Debian's postgresql"):
        require_postgres()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(PostgresHarnessError, match="CI is set"):
        require_postgres()
