"""`school-milter serve`: the long-running daemon, one process or a parent with N workers.

The parent binds the listening sockets (milter, SMTP mode) and forks workers that all
accept on both, restarts a worker that dies, forwards SIGHUP (reload rules) and SIGTERM
(finish messages in flight, then stop) to them, serves metrics, and tells systemd when
it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from milter import urls
from milter.config import Settings, host_port
from milter.errors import RulesError
from milter.multiproc import prepare_multiprocess
from milter.policy.loader import Rules, load_rules
from milter.server import Decision, MilterServer, ServerLimits, bind
from milter.sockets import listen_tcp
from milter.tally import Tally

if TYPE_CHECKING:
    from milter.followup import FollowUp
    from milter.lists import ListsSource

    # Imported for real only once the process knows whether metrics are shared between
    # workers: prometheus_client picks its value store when it is first imported.
    from milter.metrics import Metrics
    from milter.smtp_mode import SmtpGateway

log = logging.getLogger("school_milter")


def notify_systemd(state: str) -> None:
    """sd_notify: one datagram to $NOTIFY_SOCKET (Type=notify units); nothing when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


class RulesHolder:
    """The rules in force; swapped whole on a successful reload, kept on a failed one."""

    def __init__(
        self,
        path: Path,
        rules: Rules,
        metrics: Metrics | None,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.rules = rules
        self.metrics = metrics
        self.on_change = on_change
        self.digest = rules_digest(path)
        if metrics:
            metrics.dependency_up.labels("rules").set(1)

    def get(self) -> Rules:
        return self.rules

    def reload(self) -> bool:
        try:
            rules = load_rules(self.path)
        except RulesError as exc:
            log.error(
                "rules reload failed; keeping the rules in force",
                extra={"event": "reload", "ok": False, "problems": [str(p) for p in exc.problems]},
            )
            if self.metrics:
                self.metrics.dependency_up.labels("rules").set(0)
            return False
        except Exception as exc:
            log.error("rules reload failed (%s); keeping the rules in force", type(exc).__name__)
            return False
        self.rules = rules
        if self.metrics:
            self.metrics.dependency_up.labels("rules").set(1)
        log.info("rules reloaded", extra={"event": "reload", "ok": True})
        digest = rules_digest(self.path)
        if digest != self.digest:
            self.digest = digest
            if self.on_change:
                try:
                    self.on_change(digest)
                except Exception as exc:
                    log.error("could not audit the rules change: %s", type(exc).__name__)
        return True


def rules_digest(path: Path) -> str:
    """A digest of every file under rules/, so the audit log records each change of rules."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with contextlib.suppress(OSError):
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def decision_logger(
    metrics: Metrics | None, tally: Tally | None = None, rules: Callable[[], Rules] | None = None
) -> Callable[[Decision], None]:
    def record(decision: Decision) -> None:
        fields: dict[str, object] = {
            "event": "decision",
            "reference": decision.reference,
            "action": decision.action,
            "queue_id": decision.queue_id,
            "size": decision.size,
            "recipients": decision.recipients,
            "scan_ms": round(decision.scan_seconds * 1000, 2),
        }
        if decision.result:
            verdict = decision.result.verdict
            fields["direction"] = verdict.direction.value
            fields["sender_role"] = verdict.sender_role.value
            fields["clauses"] = list(verdict.clauses)
            # Detector, category and severity only: evidence stays in the quarantine.
            fields["findings"] = [f"{f.detector}/{f.category}/{f.severity}" for f in verdict.findings]
            if verdict.failed_checks:
                fields["failed_checks"] = list(verdict.failed_checks)
        if decision.error:
            fields["error"] = decision.error
        log.info("decision", extra=fields)
        if metrics:
            scanning = rules is not None and rules().policy.detectors.virus_scan.enabled
            metrics.observe(decision, virus_scanning=scanning)
        if tally:
            tally.add(decision)

    return record


def _limits(settings: Settings) -> ServerLimits:
    return ServerLimits(
        max_connections=settings.max_connections,
        idle_timeout=settings.idle_timeout,
        negotiate_timeout=settings.negotiate_timeout,
        packet_timeout=settings.packet_timeout,
        scan_timeout=settings.scan_timeout,
        progress_interval=settings.progress_interval,
        max_message_bytes=settings.max_message_bytes,
        inline_scan_bytes=settings.inline_scan_bytes,
        max_headers=settings.max_headers,
    )


def _open_followup(settings: Settings) -> tuple[FollowUp | None, ListsSource | None]:
    """The quarantine store and what goes with it, and the block lists read from it, for one
    process (engines are not shared across fork)."""
    if not settings.database:
        return None, None
    from milter import lists
    from milter.followup import FollowUp
    from milter.store import Store

    store = Store(settings.database, upgrade=False)
    # Refreshed by _refresh_lists off the event loop; read without I/O by every scan.
    source = lists.ListsSource(
        store.list_version, store.lists, settings.lists_refresh, refreshed_elsewhere=True
    )
    source.refresh()
    lists.install(source.current)
    relay = host_port(settings.reinject) if settings.reinject else None
    return FollowUp(store, relay, console_url=settings.console_url or None), source


async def _pause(events: list[asyncio.Event], seconds: float) -> None:
    """Wait until one of the events is set or the time is up."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _refresh_lists(source: ListsSource, stop: asyncio.Event, interval: float) -> None:
    """Block and allow lists from the store every `interval` seconds, in a pool thread: a scan
    reads the last snapshot and never waits on the database."""
    loop = asyncio.get_running_loop()
    failing = False
    while not stop.is_set():
        await _pause([stop], max(interval, 0.1))
        try:
            await loop.run_in_executor(None, source.refresh)
        except Exception as exc:
            if not failing:  # once per outage, not once a second
                log.warning("could not read the block lists (keeping the last ones): %s", type(exc).__name__)
            failing = True
        else:
            failing = False


async def _flush_tally(tally: Tally, followup: FollowUp, stop: asyncio.Event, interval: float = 60.0) -> None:
    """The dashboard's per-day counts, written once a minute (and once more on the way out)."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        await _pause([stop], interval)
        try:
            await loop.run_in_executor(None, tally.flush, followup.store)
        except Exception as exc:
            log.warning("could not write the dashboard counts: %s", type(exc).__name__)


async def _deliver_outbox(
    followup: FollowUp,
    interval: float,
    wake: asyncio.Event,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
) -> None:
    """Send queued guidance and alerts soon after they are queued, and retry failures.

    The loops end when `stop` is set rather than by cancellation, which asyncio.wait_for
    can swallow on Python 3.11 and leave a worker running after SIGTERM.
    """
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        await _pause([wake, stop], interval)
        wake.clear()
        try:
            done = await loop.run_in_executor(None, followup.outbox_round, 10.0)
        except Exception as exc:
            log.error("outbox delivery failed: %s", type(exc).__name__)
            continue
        for item in done.given_up:
            if metrics is not None:
                metrics.outbox_given_up.labels(item.kind).inc()
        if done.sent or done.retrying or done.given_up:
            # One line per round however many items it had (followup logs each give-up once).
            log.log(
                logging.WARNING if done.retrying or done.given_up else logging.INFO,
                "outbox",
                extra={
                    "event": "outbox",
                    "sent": done.sent,
                    "failed": done.retrying,
                    "given_up": len(done.given_up),
                    "problem": done.problem,
                },
            )


async def _run_worker(
    settings: Settings,
    rules: Rules,
    milter_sock: socket.socket | None,
    smtp_sock: socket.socket | None = None,
    primary: bool = True,
    announce_ready: bool = False,
) -> None:
    from milter.metrics import Metrics

    metrics = Metrics()
    followup, lists_source = _open_followup(settings)
    on_change = None
    if followup is not None and primary:
        store = followup.store

        def on_change(digest: str) -> None:
            store.audit("school-milter", "rules_change", str(settings.rules), "reload", digest=digest)

    holder = RulesHolder(settings.rules, rules, metrics, on_change)
    tally = Tally() if followup is not None else None
    on_decision = decision_logger(metrics, tally, holder.get)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloading: list[asyncio.Future[bool]] = []

    smtp_gateway: SmtpGateway | None = None

    def on_hup() -> None:
        # Loading builds automata: off the loop, so mail keeps flowing during a reload.
        reloading.append(loop.run_in_executor(None, holder.reload))
        if smtp_gateway is not None:  # a renewed certificate (a few small files: on the loop)
            smtp_gateway.reload_tls()
            _certificate_metric(metrics, smtp_gateway)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Handled from here on: a reload asked for while this worker started happens now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    milter_server = None
    if milter_sock is not None:
        milter_server = MilterServer(
            holder.get, _limits(settings), on_decision=on_decision, followup=followup
        )
        await milter_server.start(milter_sock)
    outbox_task = tally_task = lists_task = None
    if lists_source is not None:
        lists_task = asyncio.create_task(_refresh_lists(lists_source, stop, settings.lists_refresh))
    if followup is not None and tally is not None:
        tally_task = asyncio.create_task(_flush_tally(tally, followup, stop))
        wake = asyncio.Event()
        outbox_task = asyncio.create_task(
            _deliver_outbox(followup, settings.outbox_interval, wake, stop, metrics)
        )
        if milter_server:

            def nudge() -> None:
                loop.call_soon_threadsafe(wake.set)

            milter_server.outbox_waiting = nudge
    if smtp_sock is not None:
        from milter.smtp_mode import SmtpGateway, SmtpModeConfig

        listen_host, listen_port = host_port(settings.smtp)
        hop_host, hop_port = host_port(settings.next_hop)
        smtp_gateway = SmtpGateway(
            SmtpModeConfig(
                listen_host=listen_host,
                listen_port=listen_port,
                next_hop_host=hop_host,
                next_hop_port=hop_port,
                spool_dir=settings.spool,
                spool_min_free=settings.spool_min_free,
                max_message_bytes=settings.max_message_bytes,
                max_connections=settings.max_connections,
                timeout_seconds=settings.idle_timeout,
                tls_cert=settings.smtp_tls_cert,
                tls_key=settings.smtp_tls_key,
                require_tls=settings.smtp_require_tls,
                tls_exempt=tuple(settings.smtp_tls_exempt),
                next_hop_tls=settings.next_hop_tls,
                next_hop_tls_ca=settings.next_hop_tls_ca,
                next_hop_tls_name=settings.next_hop_tls_name or None,
                relay_connect_timeout_seconds=settings.next_hop_connect_timeout,
                relay_command_timeout_seconds=settings.next_hop_command_timeout,
                relay_stall_timeout_seconds=settings.next_hop_stall_timeout,
                relay_final_reply_timeout_seconds=settings.next_hop_final_reply_timeout,
                reply_deadline_seconds=settings.smtp_reply_deadline,
                stop_grace_seconds=settings.shutdown_grace,
            ),
            holder.get,
            followup=followup,
        )
        # The same decision line and metrics as the milter path: size, findings, clamd health.
        smtp_gateway.on_decision = lambda verdict, envelope, seconds, result: on_decision(
            Decision(
                verdict.reference,
                verdict.action.value,
                seconds,
                envelope.queue_id,
                result.message.size,
                len(envelope.rcpt_to),
                result,
            )
        )
        await smtp_gateway.start(smtp_sock)
        _certificate_metric(metrics, smtp_gateway)
    log.info("worker ready", extra={"event": "ready", "pid": os.getpid()})
    if announce_ready:
        notify_systemd("READY=1")
    await stop.wait()
    log.info("stopping: finishing messages in flight", extra={"event": "stopping", "pid": os.getpid()})
    _exit_if_stuck(settings.shutdown_grace + 15)
    # Both at once: each may take shutdown_grace, and the watchdog allows that once.
    await asyncio.gather(
        *([milter_server.stop(settings.shutdown_grace)] if milter_server else []),
        *([smtp_gateway.stop()] if smtp_gateway else []),
    )
    background = [t for t in (outbox_task, tally_task, lists_task) if t]
    if background:
        # They see `stop` and end after their current round (a last count flush included).
        _done, pending = await asyncio.wait(background, timeout=15)
        for task in pending:
            task.cancel()
    if followup:
        followup.store.close()


def _certificate_metric(metrics: Metrics, gateway: SmtpGateway) -> None:
    if gateway.certificate_expires is not None:
        metrics.tls_certificate_expiry.set(gateway.certificate_expires.timestamp())


def _exit_if_stuck(seconds: float) -> None:
    """After SIGTERM, leave within `seconds` whatever happens: a stop that hangs must not
    leave a worker holding the socket (systemd would SIGKILL it later, a test harness not)."""

    def leave() -> None:
        log.error("stopping took longer than %.0f s: exiting now", seconds)
        os._exit(1)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def _worker_main(
    settings: Settings,
    rules: Rules,
    milter_sock: socket.socket | None,
    smtp_sock: socket.socket | None = None,
    primary: bool = True,
    announce_ready: bool = False,
) -> None:
    asyncio.run(_run_worker(settings, rules, milter_sock, smtp_sock, primary, announce_ready))


def serve(settings: Settings) -> int:
    """Run until SIGTERM; returns the process exit status."""
    # A reload asked for while starting waits (blocked, pending) until a worker's event loop
    # handles SIGHUP; its default action would end the process. Workers inherit the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        rules = load_rules(settings.rules)
    except RulesError as exc:
        for problem in exc.problems:
            log.error("rules problem: %s", problem)
        log.error("not starting: the rules in %s have %d problem(s)", settings.rules, len(exc.problems))
        return 2
    for warning in rules.warnings:
        log.warning(warning)
    urls.preload()
    if settings.smtp and not _smtp_tls_usable(settings):
        return 2
    if settings.database:
        # Migrate once, here, before any worker opens the store.
        from milter.store import Store, StoreError

        try:
            Store(settings.database).close()
        except (StoreError, OSError) as exc:
            log.error("cannot open the quarantine store: %s", exc)
            return 2
        except Exception as exc:
            log.error(
                "cannot open the quarantine store %s: %s", safe_url(settings.database), type(exc).__name__
            )
            return 2
    try:
        milter_sock = bind(settings.milter) if settings.milter else None
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.milter, exc.strerror)
        return 1
    if milter_sock is None and not settings.smtp:
        log.error("nothing to serve: set milter or smtp")
        return 2
    try:
        # Bound here, before any fork, so every worker accepts SMTP on the same socket.
        smtp_sock = listen_tcp(*host_port(settings.smtp)) if settings.smtp else None
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.smtp, exc.strerror)
        if milter_sock is not None:
            milter_sock.close()
        return 1
    log.info(
        "listening",
        extra={
            "event": "listening",
            "milter": settings.milter,
            "smtp": settings.smtp,
            "workers": settings.workers,
        },
    )
    if settings.workers == 1:
        if settings.metrics:
            from milter.metrics import serve_metrics

            try:
                serve_metrics(*host_port(settings.metrics), multiprocess_mode=False)
            except OSError as exc:
                log.error("cannot serve metrics on %s: %s", settings.metrics, exc.strerror)
                return 2
        # READY=1 comes from the worker once it serves and handles SIGHUP.
        _worker_main(settings, rules, milter_sock, smtp_sock, announce_ready=True)
        notify_systemd("STOPPING=1")
        return 0
    return _supervise(settings, rules, milter_sock, smtp_sock)


def _smtp_tls_usable(settings: Settings) -> bool:
    """Load SMTP mode's certificate, key and CA file once in the parent, so a bad file stops
    the start with its name (each worker loads them again for its own TLS contexts)."""
    from milter.smtp_tls import TlsSetupError, relay_tls_context, server_tls_context

    try:
        if settings.smtp_tls_cert is not None and settings.smtp_tls_key is not None:
            server_tls_context(settings.smtp_tls_cert, settings.smtp_tls_key)
        relay_tls_context(settings.next_hop_tls, settings.next_hop_tls_ca)
    except TlsSetupError as exc:
        log.error("not starting: %s", exc, extra={"event": "tls_setup_failed"})
        return False
    return True


def _supervise(
    settings: Settings, rules: Rules, milter_sock: socket.socket | None, smtp_sock: socket.socket | None
) -> int:
    """Parent of N workers sharing the listening sockets (milter and SMTP mode).

    SMTP mode's spool is shared too: its files carry the handling worker's pid, so a
    restarted worker reports only what dead workers left (milter.smtp_mode.Spool).
    """
    metrics_dir = Path(tempfile.mkdtemp(prefix="school-milter-metrics-"))
    prepare_multiprocess(metrics_dir)
    from milter.metrics import serve_metrics, worker_exited

    children: dict[int, int] = {}  # pid -> worker index
    stopping = False
    failed_status = 0  # set when the supervisor itself gives up: 1 workers keep dying, 2 metrics
    # The rules a new worker starts with: those of the last reload that loaded, so a worker
    # that replaces a dead one runs what its siblings run.
    current = rules

    def spawn(index: int) -> None:
        # SIGHUP stays blocked across fork: the child unblocks it once its loop handles it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                _worker_main(settings, current, milter_sock, smtp_sock, primary=index == 0)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        children[pid] = index
        if handling:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping, current
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            # Connections from now on are refused at once rather than left waiting in a
            # listen queue nobody will serve (each worker closes its copy as it stops).
            for sock in (milter_sock, smtp_sock):
                if sock is not None:
                    sock.close()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
        if sig == signal.SIGHUP:
            # On failure the workers log why and keep theirs; new workers get the same.
            with contextlib.suppress(RulesError):
                current = load_rules(settings.rules)

    handling = False
    for index in range(settings.workers):
        spawn(index)
    # After forking, so the workers do not inherit the metrics listener.
    if settings.metrics:
        try:
            serve_metrics(*host_port(settings.metrics), multiprocess_mode=True)
        except OSError as exc:
            log.error("cannot serve metrics on %s: %s; stopping", settings.metrics, exc.strerror)
            stopping, failed_status = True, 2
            forward(signal.SIGTERM, None)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    handling = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    if not stopping:
        notify_systemd("READY=1")
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, -1)
        worker_exited(pid)
        if index < 0 or stopping:
            continue
        # A worker died on its own: replace it, but not in a tight loop.
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        log.error(
            "worker %d (pid %d) exited with status %d; restarting",
            index,
            pid,
            os.waitstatus_to_exitcode(status),
        )
        if len(restarts) > 10:
            log.error("workers keep dying (more than 10 in a minute): stopping")
            # A failure exit, so that systemd's Restart=on-failure starts the gateway again.
            stopping, failed_status = True, 1
            forward(signal.SIGTERM, None)
            continue
        time.sleep(min(1.0, 0.1 * len(restarts)))
        spawn(index)
    notify_systemd("STOPPING=1")
    # The workers' metric files: nobody reads them once every worker has gone.
    shutil.rmtree(metrics_dir, ignore_errors=True)
    if failed_status:
        return failed_status
    return 0 if stopping else 1


def safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main_serve(settings: Settings) -> int:
    from milter.logs import setup_logging

    setup_logging(settings.log_level)
    try:
        return serve(settings)
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stderr.flush()
