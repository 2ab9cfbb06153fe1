"""The `school-milter` command: scan messages and check rules/ from the shell."""

from __future__ import annotations

import argparse
import json
import mailbox
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from milter import __version__
from milter.engine import Scan, scan
from milter.envelope import Envelope
from milter.errors import RulesError
from milter.guidance import render_guidance
from milter.policy.loader import Rules, load_rules

RULES_ENV = "SCHOOL_MILTER_RULES"


def default_rules_dir() -> Path:
    """$SCHOOL_MILTER_RULES, else ./rules, else the example rules beside the package."""
    if os.environ.get(RULES_ENV):
        return Path(os.environ[RULES_ENV])
    if Path("rules/policy.yaml").is_file():
        return Path("rules")
    return Path(__file__).resolve().parent.parent / "rules"


def _looks_like_mbox(data: bytes) -> bool:
    return data.startswith(b"From ") and b"\nFrom " in data


def iter_messages(source: str) -> Iterator[tuple[str, bytes]]:
    """(label, raw bytes) for each message in a file, directory (recursively), mbox or '-'."""
    if source == "-":
        data = sys.stdin.buffer.read()
        yield from _split(source, data, None)
        return
    path = Path(source)
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            yield from iter_messages(str(child))
        return
    data = path.read_bytes()
    yield from _split(source, data, path)


def _split(label: str, data: bytes, path: Path | None) -> Iterator[tuple[str, bytes]]:
    if not _looks_like_mbox(data) or path is None:
        yield label, data
        return
    box = mailbox.mbox(str(path), create=False)
    try:
        for i, key in enumerate(box.iterkeys(), 1):
            yield f"{label}#{i}", box.get_bytes(key)
    finally:
        box.close()


def _print_text(label: str, result: Scan, rules: Rules) -> None:
    v = result.verdict
    print(f"== {label}")
    print(
        f"verdict:   {v.action.value.upper()}   reference {v.reference}   "
        f"({v.direction.value}, {v.sender_role.value})"
    )
    if v.reply:
        print(f"reply:     {v.reply}")
    if v.subject_prefix:
        print(f"subject:   prefixed with {v.subject_prefix!r}")
    for name, value in v.headers:
        print(f"header:    {name}: {value}")
    if v.findings:
        print("findings:")
        for f in v.findings:
            evidence = f"  [{'; '.join(f.evidence)}]" if f.evidence else ""
            print(f"  - {f.detector}/{f.category}  {f.severity}  clause {f.clause}: {f.summary}{evidence}")
    if v.failed_checks:
        print(f"failed:    {', '.join(v.failed_checks)} (could not run)")
    if v.alerts:
        contacts = rules.policy.school.contacts
        named = [f"{role} <{contacts.get(role, '?')}>" for role in v.alerts]
        print(f"alerts:    {', '.join(named)}")
    if v.guidance:
        print("guidance to the sender:")
        for line in render_guidance(v, result.context, rules).rstrip().splitlines():
            print(f"  | {line}")
    print()


def cmd_scan(args: argparse.Namespace) -> int:
    rules = _load_or_report(Path(args.rules or default_rules_dir()))
    if rules is None:
        return 2
    envelope = Envelope(
        mail_from=args.mail_from,
        rcpt_to=tuple(args.rcpt or ()),
        client_address=args.client_ip,
        auth_user=args.auth_user,
    )
    status = 0
    for source in args.sources:
        try:
            for label, raw in iter_messages(source):
                result = scan(raw, envelope, rules)
                if args.json:
                    record = {"source": label, **result.verdict.as_dict()}
                    if result.verdict.guidance:
                        record["guidance_text"] = render_guidance(result.verdict, result.context, rules)
                    print(json.dumps(record, ensure_ascii=False))
                else:
                    _print_text(label, result, rules)
        except OSError as exc:
            print(f"school-milter: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
            status = 1
    return status


def _load_or_report(path: Path) -> Rules | None:
    try:
        rules = load_rules(path)
    except RulesError as exc:
        print(f"school-milter: the rules in {path} have {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return None
    for warning in rules.warnings:
        print(f"school-milter: warning: {warning}", file=sys.stderr)
    return rules


def cmd_check_rules(args: argparse.Namespace) -> int:
    path = Path(args.directory or args.rules or default_rules_dir())
    rules = _load_or_report(path)
    if rules is None:
        return 1
    from milter.preflight import describe_rules

    print(f"{path}: OK: {describe_rules(rules)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from milter.config import load_settings
    from milter.daemon import main_serve

    overrides: dict[str, object] = {
        "rules": args.rules or (None if args.config else default_rules_dir()),
        "milter": args.milter,
        "smtp": args.smtp,
        "next_hop": args.next_hop,
        "smtp_tls_cert": args.smtp_tls_cert,
        "smtp_tls_key": args.smtp_tls_key,
        "smtp_require_tls": args.smtp_require_tls,
        "next_hop_tls": args.next_hop_tls,
        "next_hop_tls_ca": args.next_hop_tls_ca,
        "next_hop_tls_name": args.next_hop_tls_name,
        "workers": args.workers,
        "metrics": args.metrics,
        "spool": args.spool,
        "database": args.database,
        "inline_scan_bytes": args.inline_scan_bytes,
        "reinject": args.reinject,
        "log_level": args.log_level,
    }
    try:
        settings = load_settings(args.config, overrides)
    except RulesError as exc:
        for problem in exc.problems:
            print(f"school-milter: {problem}", file=sys.stderr)
        return 2
    if args.check:
        from milter.preflight import preflight

        where = args.config or "command line and defaults"
        print(f"ok       config {where}")
        return preflight(settings)
    return main_serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="school-milter", description="Enforce the school's Electronic Communications Policy on mail."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--rules",
        # No default here: `serve --config` takes `rules` from the file unless given here.
        help=f"rules directory (default: the config file's rules, else ${RULES_ENV} or ./rules)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="scan messages and print each verdict")
    p.add_argument("sources", nargs="+", metavar="FILE|DIR|MBOX|-")
    p.add_argument("--mail-from", help="envelope sender (default: the From header)")
    p.add_argument("--rcpt", action="append", help="envelope recipient; repeat for more (default: To/Cc/Bcc)")
    p.add_argument("--auth-user", help="SMTP-authenticated user: marks the sender as trusted")
    p.add_argument(
        "--client-ip", help="connecting client address (trusted if in the rules' trusted networks)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("serve", help="run the gateway: milter and/or SMTP mode")
    p.add_argument(
        "--config", type=Path, help="TOML file with a [gateway] table (see deploy/school-milter.toml)"
    )
    p.add_argument(
        "--milter", help="milter socket, e.g. inet:127.0.0.1:8894 or unix:/run/school-milter/milter.sock"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="check config, rules, TLS files, store and clamd without starting; exit 2 on a problem",
    )
    p.add_argument("--smtp", help="SMTP mode: HOST:PORT to listen on")
    p.add_argument("--next-hop", help="SMTP mode: HOST:PORT accepted mail is relayed to")
    p.add_argument("--smtp-tls-cert", metavar="PEM", help="SMTP mode: certificate (chain) for STARTTLS")
    p.add_argument("--smtp-tls-key", metavar="PEM", help="SMTP mode: the certificate's unencrypted key")
    p.add_argument(
        "--smtp-require-tls",
        action=argparse.BooleanOptionalAction,
        help="SMTP mode: refuse MAIL before STARTTLS, except from smtp_tls_exempt (loopback)",
    )
    p.add_argument(
        "--next-hop-tls",
        choices=["opportunistic", "required", "off"],
        help="SMTP mode: STARTTLS to the next hop (default opportunistic)",
    )
    p.add_argument("--next-hop-tls-ca", metavar="PEM", help="SMTP mode: CA file for --next-hop-tls required")
    p.add_argument(
        "--next-hop-tls-name",
        metavar="NAME",
        help="SMTP mode: the name the next hop's certificate must carry (default: the --next-hop host)",
    )
    p.add_argument("--workers", type=int, help="worker processes sharing the socket (default 1)")
    p.add_argument("--metrics", help="HOST:PORT for Prometheus metrics; '' to disable")
    p.add_argument("--spool", type=Path, help="spool directory for SMTP mode")
    p.add_argument(
        "--database",
        help="quarantine store URL (default sqlite:///var/quarantine.db); '' for the MTA's hold queue",
    )
    p.add_argument(
        "--reinject", help="HOST:PORT of the MTA listener without milter (releases, guidance, alerts)"
    )
    p.add_argument("--inline-scan-bytes", type=int, help="scan messages up to this size on the loop thread")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    from milter import quarantine_cli

    quarantine_cli.add_commands(sub)
    from milter.web import cli as web_cli

    web_cli.add_commands(sub)

    p = sub.add_parser("check-rules", help="check a rules directory and report every problem")
    p.add_argument("directory", nargs="?", help="rules directory (default: --rules)")
    p.set_defaults(func=cmd_check_rules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("quarantine", "block", "allow", "lists"):
            from milter import quarantine_cli

            return quarantine_cli.run(args)
        result: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return result


if __name__ == "__main__":
    sys.exit(main())
