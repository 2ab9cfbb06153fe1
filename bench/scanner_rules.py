"""A copy of rules/ whose virus scanning goes to another clamd than the system's.

For the benchmarks, a private clamd with the test signature database, so they measure the
whole scan without the system's clamd, or with scanning off when clamd is not installed
(shared by engine_bench.py and postfix_bench.py). For the local stack
(deploy/local-stack.sh), the same copy pointed at the clamd the stack starts, from the
command line:

    .venv/bin/python bench/scanner_rules.py --rules rules --output var/local-stack/rules \\
        --clamd unix:/path/clamd.ctl [--clamd-conf /path/clamd.conf]

Only the `clamd:` (and `clamd_conf:`) lines of virus_scan in policy.yaml change, in place,
so a problem the gateway reports at line N of the copy is at line N of the original too.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.clamd_harness import ClamdInstance, clamd_available  # noqa: E402

_BLOCK = re.compile(r"^(?P<indent> *)virus_scan:[ \t]*(#.*)?$")
_SETTING = re.compile(r"^(?P<indent> +)(?P<key>clamd|clamd_conf):[ \t]*(?P<value>[^#\n]*?)[ \t]*(#.*)?$")


def point_policy_at_clamd(text: str, clamd: str, clamd_conf: str | None = None) -> str:
    """policy.yaml text with virus_scan's clamd (and clamd_conf) set, each line edited in place.

    A setting the block does not spell out is added as its first line. Raises ValueError
    when policy.yaml has no virus_scan block.
    """
    lines = text.split("\n")
    found = next(((i, match) for i, line in enumerate(lines) if (match := _BLOCK.match(line))), None)
    if found is None:
        raise ValueError("policy.yaml has no virus_scan block: nothing to point at a clamd")
    start, outer = found[0], len(found[1]["indent"])
    wanted = {"clamd": clamd} if clamd_conf is None else {"clamd": clamd, "clamd_conf": clamd_conf}
    child_indent: str | None = None
    end = start + 1
    while end < len(lines):
        line = lines[end]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if stripped and not stripped.startswith("#") and indent <= outer:
            break
        setting = _SETTING.match(line)
        if stripped and not stripped.startswith("#") and child_indent is None:
            child_indent = line[:indent]
        if setting and setting["indent"] == child_indent and setting["key"] in wanted:
            lines[end] = f"{child_indent}{setting['key']}: {wanted.pop(setting['key'])}"
        end += 1
    child_indent = child_indent or " " * (outer + 2)
    for key, value in reversed(list(wanted.items())):
        lines.insert(start + 1, f"{child_indent}{key}: {value}")
    return "\n".join(lines)


def write_rules_for_clamd(source: Path, target: Path, clamd: str, clamd_conf: str | None = None) -> Path:
    """Copy rules/ `source` to `target` with virus scanning going to `clamd`; returns `target`.

    An existing `target` is replaced whole, by renaming, so a gateway re-reading it (SIGHUP)
    finds either the old copy or the new one, never half of each.
    """
    source, target = Path(source).resolve(), Path(target).resolve()
    if not (source / "policy.yaml").is_file():
        raise ValueError(f"{source} has no policy.yaml: not a rules directory")
    fresh = target.with_name(target.name + ".new")
    stale = target.with_name(target.name + ".old")
    for leftover in (fresh, stale):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.copytree(source, fresh)
    policy = fresh / "policy.yaml"
    policy.write_text(point_policy_at_clamd(policy.read_text(), clamd, clamd_conf))
    if target.exists():
        target.rename(stale)
    fresh.rename(target)
    shutil.rmtree(stale, ignore_errors=True)
    return target


def rules_with_private_clamd(stack: contextlib.ExitStack, work: Path, source: Path) -> tuple[Path, str]:
    """(rules directory, what scans viruses); the clamd stops when `stack` closes."""
    rules_dir = work / "rules"
    if clamd_available():
        clamd = stack.enter_context(ClamdInstance(work / "clamd"))
        write_rules_for_clamd(source, rules_dir, clamd.unix_address)
        scanner = "a private clamd with the test signature database"
    else:
        shutil.copytree(source, rules_dir)
        policy = rules_dir / "policy.yaml"
        text = policy.read_text().replace("\n  virus_scan:\n", "\n  virus_scan:\n    enabled: false\n", 1)
        policy.write_text(text)
        scanner = "OFF (clamd is not installed)"
    return rules_dir, scanner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a copy of rules/ whose virus scanning uses another clamd."
    )
    parser.add_argument(
        "--rules", type=Path, default=ROOT / "rules", help="the rules to copy (default rules/)"
    )
    parser.add_argument("--output", type=Path, required=True, help="the copy (replaced if it exists)")
    parser.add_argument("--clamd", required=True, help="unix:/path/clamd.ctl or inet:127.0.0.1:PORT")
    parser.add_argument("--clamd-conf", help="that clamd's clamd.conf, for the gateway's size-limit check")
    args = parser.parse_args(argv)
    try:
        write_rules_for_clamd(args.rules, args.output, args.clamd, args.clamd_conf)
    except (OSError, ValueError) as exc:
        print(f"scanner_rules: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
