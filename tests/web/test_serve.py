"""`school-milter web` serves the console with uvicorn; configuration mistakes end in one line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from milter.store import Store
from milter.web.auth import create_account
from tests.postfix_harness import free_port, port_open

# What `school-milter` runs once milter/cli.py adds these commands (milter.web.cli.add_commands).
ENTRY = (
    "import argparse, sys\n"
    "from milter.web import cli\n"
    "parser = argparse.ArgumentParser(prog='school-milter')\n"
    "cli.add_commands(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)
REPO = Path(__file__).resolve().parents[2]


def school_milter(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ENTRY, *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_web_serves_the_console_on_loopback(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path}/q.db"
    create_account(Store(database), "tech", "technician", "correct horse battery staple")
    port = free_port()
    process = school_milter(
        "web", "--database", database, "--listen", f"127.0.0.1:{port}", "--insecure-http-loopback"
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "the console did not start"
            time.sleep(0.1)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Origin": f"http://127.0.0.1:{port}"}
        ) as client:
            page = client.get("/login")
            assert page.status_code == 200 and "Sign in" in page.text
            assert "server" not in page.headers  # no server banner
            token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            signed = client.post(
                "/login",
                data={"username": "tech", "password": "correct horse battery staple", "csrf_token": token},
            )
            assert signed.status_code == 303
            assert client.get("/quarantine").status_code == 200
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    # Nothing a user typed (a search, a password) is in the console's own output.
    assert "correct horse" not in err and "/quarantine" not in err


def test_plain_http_is_refused_off_loopback(tmp_path: Path) -> None:
    process = school_milter(
        "web",
        "--database",
        f"sqlite:///{tmp_path}/q.db",
        "--listen",
        "0.0.0.0:8099",
        "--insecure-http-loopback",
    )
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.count("\n") == 1 and "only when listening on loopback" in err
