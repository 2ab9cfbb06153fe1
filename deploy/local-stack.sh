#!/usr/bin/env bash
# Local development stack: a private Postfix on 127.0.0.1:2525 whose milter is the gateway,
# delivering everything to a sink that writes each message to var/delivered/, and a
# private clamd for the gateway's virus scan.
#
#   deploy/local-stack.sh [start] [--with-daemon CMD]   start (or refresh) the stack
#   deploy/local-stack.sh stop                          stop everything it started
#   deploy/local-stack.sh status                        what is running
#
# What runs (all on loopback, state under var/ in the repository, which git ignores):
#   Postfix   127.0.0.1:2525, its own config/queue in var/local-stack/postfix, log in
#             var/local-stack/maillog; milter inet:127.0.0.1:8894, milter_default_action
#             = tempfail (as in deploy/postfix/main.cf.snippet); no local delivery: every
#             message is relayed to the sink. The system's own Postfix is not touched.
#             A second smtpd on 127.0.0.1:2527 runs no milter: the gateway delivers
#             released messages, guidance mail and alerts there.
#   sink      Postfix's smtp-sink on 127.0.0.1:2526, writing one file per delivered
#             message to var/delivered/ (the message as Postfix relayed it, preceded by
#             smtp-sink's X-Client-Addr, X-Mail-Args and X-Rcpt-Args envelope lines).
#   clamd     a private clamd (as root) on the UNIX socket var/local-stack/clamd/clamd.ctl,
#             its config var/local-stack/clamd/clamd.conf generated from
#             deploy/clamd/clamd.conf with only the socket, user, database, pid and log
#             lines replaced, log var/local-stack/clamd/clamd.log. Signatures: the official
#             database when /var/lib/clamav has one (freshclam ran; clamd then needs
#             20-60 s and about 1 GB of memory to start), otherwise only the project's test
#             signature (tests/data/clamav/test-signatures.ndb), which finds the EICAR test
#             file and nothing else. The system's clamd is not touched. Start waits for
#             clamd's PONG before it starts the gateway.
#   rules     var/local-stack/rules: a copy of rules/ whose virus_scan.clamd is the private
#             clamd (bench/scanner_rules.py writes it; only that line and clamd_conf
#             differ). The gateway of the stack must be given `--rules` that copy; each
#             start writes it afresh (and sends SIGHUP to a gateway this script started),
#             so edit rules/, never the copy.
#   gateway   NOT started by default: the Makefile starts the daemon. With
#             `--with-daemon CMD` this script starts CMD too (in the background, log in
#             var/local-stack/daemon.log) and stops it on `stop`. Either way, start waits
#             briefly for the milter port and says if nothing listens there: until the
#             gateway runs, Postfix answers 451 4.7.1 (tempfail), it does not pass mail.
#
# Running it twice is harmless: what runs is kept (Postfix re-reads its configuration),
# nothing is started twice. Needs root and `apt-get install postfix swaks clamav-daemon`.
# Ports and the milter can be changed: SMTP_PORT=2525 SINK_PORT=2526 REINJECT_PORT=2527
# MILTER=inet:127.0.0.1:8894 deploy/local-stack.sh
# Other settings from the environment:
#   LOCAL_STACK_DIR=DIR      all state under DIR instead of var/local-stack (delivered
#                            mail in DIR/delivered): a second, independent stack (tests)
#   CLAMD_SIGNATURES=test    the test signature even when an official database exists
#                            (default auto); CLAMD_SIGNATURES=none starts no clamd
#   RULES_SOURCE=DIR         the rules the copy is made from (default rules/)
#   LOCAL_STACK_PYTHON=PATH  the Python with the project installed (default .venv/bin/python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${LOCAL_STACK_DIR:-}" ]; then
  mkdir -p "$LOCAL_STACK_DIR"
  VAR="$(cd "$LOCAL_STACK_DIR" && pwd)"
  DELIVERED="$VAR/delivered"
else
  VAR="$REPO/var/local-stack"
  DELIVERED="$REPO/var/delivered"
fi
CONF="$VAR/postfix/conf"
QUEUE="$VAR/postfix/queue"
MAILLOG="$VAR/maillog"
SMTP_PORT="${SMTP_PORT:-2525}"
SINK_PORT="${SINK_PORT:-2526}"
# Released mail, guidance and alerts come back in here: an smtpd with no milter.
REINJECT_PORT="${REINJECT_PORT:-2527}"
MILTER="${MILTER:-inet:127.0.0.1:8894}"
# Fallback data directory, used only when postfix cannot reach var/ (see data_directory()).
# A stack in another LOCAL_STACK_DIR gets its own, so two stacks never share master.lock.
OUTSIDE_DATA="/var/lib/school-milter-local-stack"
[ -n "${LOCAL_STACK_DIR:-}" ] && OUTSIDE_DATA="$OUTSIDE_DATA/$(printf '%s' "$VAR" | cksum | cut -d' ' -f1)"
# The private clamd: config generated from the deployment's clamd.conf, so the limits
# (StreamMaxLength, MaxFileSize, MaxScanTime, ...) are the ones a school runs with.
CLAMD_BIN=/usr/sbin/clamd
CLAMD_DIR="$VAR/clamd"
CLAMD_CONF="$CLAMD_DIR/clamd.conf"
CLAMD_SOCKET="$CLAMD_DIR/clamd.ctl"
CLAMD_ADDRESS="unix:$CLAMD_SOCKET"
CLAMD_SIGNATURES="${CLAMD_SIGNATURES:-auto}"
CLAMD_START_TIMEOUT="${CLAMD_START_TIMEOUT:-180}"  # seconds; the official database is slow
BASE_CLAMD_CONF="$REPO/deploy/clamd/clamd.conf"
TEST_SIGNATURES="$REPO/tests/data/clamav"
OFFICIAL_DATABASE=/var/lib/clamav
# The gateway's rules for this stack: rules/ with virus_scan.clamd = the private clamd.
RULES_SOURCE="${RULES_SOURCE:-$REPO/rules}"
STACK_RULES="$VAR/rules"
PY="${LOCAL_STACK_PYTHON:-$REPO/.venv/bin/python}"

say() { printf 'local-stack: %s\n' "$*"; }
die() { printf 'local-stack: %s\n' "$*" >&2; exit 1; }

# A pid file holds "PID STARTTIME" (the process start time from /proc/PID/stat), so a
# stale pid file, or a pid the kernel has since given to another program, is never taken
# for ours and never signalled.
start_time() {
  local stat rest fields
  { stat=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
  rest=${stat##*) }  # the fields after "(comm)"; comm may contain spaces
  read -r -a fields <<<"$rest"
  echo "${fields[19]}"  # field 22 of stat
}

remember() { echo "$2 $(start_time "$2")" >"$1"; }

running() {
  local pidfile=$1 pid started now
  [ -s "$pidfile" ] || return 1
  read -r pid started <"$pidfile" || return 1
  now=$(start_time "$pid") || return 1
  [ "$now" = "$started" ]
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

milter_listening() {
  case "$MILTER" in
    inet:*) local hp=${MILTER#inet:}; port_open "${hp%:*}" "${hp##*:}" ;;
    unix:*) [ -S "${MILTER#unix:}" ] ;;
    *) return 1 ;;
  esac
}

# Postfix's master opens data_directory/master.lock as the postfix user, so postfix must
# be able to reach it: a checkout under /root (mode 0700) is out of its reach, and then
# the data directory (one lock file and caches, no mail) lives under /var/lib instead.
data_directory() {
  mkdir -p "$VAR/postfix"
  if runuser -u postfix -- test -x "$VAR/postfix" 2>/dev/null; then
    echo "$VAR/postfix/data"
  else
    echo "$OUTSIDE_DATA"
  fi
}

write_config() {
  local data=$1
  mkdir -p "$CONF" "$QUEUE" "$data" "$DELIVERED"
  chown postfix:postfix "$data"
  chmod 700 "$data"
  cat >"$CONF/main.cf" <<EOF
# Written by deploy/local-stack.sh: a private Postfix for development. Edit the script.
compatibility_level = 3.6
queue_directory = $QUEUE
data_directory = $data
mail_owner = postfix
setgid_group = postdrop
myhostname = local-stack.localdomain
mydomain = localdomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# No local delivery: every message, bounces included, goes to the sink.
mydestination =
# The school's domains are accepted from anyone, so mail "from outside" (XCLIENT below)
# to staff is taken in and scanned as inbound.
relay_domains = redborne.example, students.redborne.example
# Loopback clients may claim another address with XCLIENT: how the swaks example plays an
# outside sender. Never on a real server.
smtpd_authorized_xclient_hosts = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
# The log is a file here; Postfix refuses a maillog_file outside maillog_file_prefixes.
maillog_file = $MAILLOG
maillog_file_prefixes = $VAR
# Retry deferred mail within seconds, not minutes: a message tempfailed while the
# gateway was down is delivered soon after it comes up.
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 30s
delay_warning_time = 0h
biff = no
# The gateway, as deploy/postfix/main.cf.snippet wires it into a school's Postfix.
smtpd_milters = $MILTER
non_smtpd_milters = \$smtpd_milters
milter_default_action = tempfail
milter_protocol = 6
milter_connect_timeout = 10s
milter_command_timeout = 30s
milter_content_timeout = 60s
milter_connect_macros = j {daemon_name} {daemon_addr} v _ {client_addr} {client_name}
milter_mail_macros = i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}
milter_rcpt_macros = i {rcpt_addr} {rcpt_host} {rcpt_mailer}
milter_end_of_data_macros = i {auth_authen} {client_addr} {client_name}
EOF
  # No chroot: a chrooted daemon would need copies of /etc files inside the queue dir.
  cat >"$CONF/master.cf" <<EOF
127.0.0.1:$SMTP_PORT inet n - n - - smtpd
127.0.0.1:$REINJECT_PORT inet n - n - - smtpd
  -o syslog_name=postfix/school-reinject
  -o smtpd_milters=
  -o receive_override_options=no_milters
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

start_sink() {
  if running "$VAR/sink.pid"; then
    say "sink already running (pid $(cut -d' ' -f1 "$VAR/sink.pid"))"
    return
  fi
  port_open 127.0.0.1 "$SINK_PORT" && die "port $SINK_PORT is taken by another program (set SINK_PORT)"
  # -u root: smtp-sink must be told a user when started as root; the files it writes are
  # the developer's, in the developer's checkout. -d: one file per message, named by time
  # plus a random suffix. setsid: it outlives this script and the terminal.
  setsid /usr/sbin/smtp-sink -u root -d "$DELIVERED/%Y%m%d-%H%M%S." 127.0.0.1:"$SINK_PORT" 64 \
    </dev/null >>"$VAR/sink.log" 2>&1 &
  remember "$VAR/sink.pid" $!
  for _ in $(seq 50); do port_open 127.0.0.1 "$SINK_PORT" && break; sleep 0.1; done
  port_open 127.0.0.1 "$SINK_PORT" || die "smtp-sink did not start: see $VAR/sink.log"
  say "sink on 127.0.0.1:$SINK_PORT writing to ${DELIVERED#"$REPO"/}/ (pid $!)"
}

start_postfix() {
  if postfix -c "$CONF" status >/dev/null 2>&1; then
    postfix -c "$CONF" reload >/dev/null 2>&1 || die "postfix reload failed: see $MAILLOG"
    say "Postfix already running on 127.0.0.1:$SMTP_PORT (configuration reloaded)"
    return
  fi
  port_open 127.0.0.1 "$SMTP_PORT" && die "port $SMTP_PORT is taken by another program (set SMTP_PORT)"
  # `start` creates the queue directories with their owners on first use (a few seconds).
  postfix -c "$CONF" start >/dev/null 2>&1 || die "Postfix did not start: see $MAILLOG"
  for _ in $(seq 100); do port_open 127.0.0.1 "$SMTP_PORT" && break; sleep 0.1; done
  port_open 127.0.0.1 "$SMTP_PORT" || die "Postfix is not listening on $SMTP_PORT: see $MAILLOG"
  say "Postfix on 127.0.0.1:$SMTP_PORT, milter $MILTER (log: ${MAILLOG#"$REPO"/})"
}

# -- clamd -------------------------------------------------------------------------------

# Options the stack sets itself; every other line of deploy/clamd/clamd.conf is kept as is
# (clamd reads each option once, the first occurrence wins, so they are taken out of the
# base rather than repeated). No User: clamd stays root and can use var/ wherever the
# checkout is; it listens on a private UNIX socket only (TCPSocket goes too, so it never
# takes the system clamd's port 3310).
CLAMD_PRIVATE_OPTIONS="Example Foreground LocalSocket LocalSocketGroup LocalSocketMode FixStaleSocket
TCPSocket TCPAddr User DatabaseDirectory TemporaryDirectory LogFile LogSyslog PidFile"

official_database() {
  compgen -G "$OFFICIAL_DATABASE/*.cvd" >/dev/null || compgen -G "$OFFICIAL_DATABASE/*.cld" >/dev/null
}

# Which signatures the clamd about to start loads: prints the database directory.
clamd_database() {
  if [ "$CLAMD_SIGNATURES" = auto ] && official_database; then
    echo "$OFFICIAL_DATABASE"
    return
  fi
  # The project's test signatures only, copied afresh (clamd loads every *.ndb/*.hdb there).
  local db="$CLAMD_DIR/db"
  rm -rf "$db"
  mkdir -p "$db"
  compgen -G "$TEST_SIGNATURES/*.ndb" >/dev/null || die "no test signatures in $TEST_SIGNATURES"
  cp "$TEST_SIGNATURES"/*.ndb "$db"/
  if compgen -G "$TEST_SIGNATURES/*.hdb" >/dev/null; then cp "$TEST_SIGNATURES"/*.hdb "$db"/; fi
  echo "$db"
}

write_clamd_config() {
  local database=$1
  [ -f "$BASE_CLAMD_CONF" ] || die "missing $BASE_CLAMD_CONF"
  {
    echo "# Written by deploy/local-stack.sh from deploy/clamd/clamd.conf: the private clamd of the"
    echo "# local stack. Only the lines up to the blank line differ from that file; edit it, not this."
    echo "Foreground yes"
    echo "LocalSocket $CLAMD_SOCKET"
    echo "LocalSocketMode 600"
    echo "FixStaleSocket true"
    echo "DatabaseDirectory $database"
    echo "LogFile $CLAMD_DIR/clamd.log"
    echo "LogSyslog false"
    echo
    awk -v private="$CLAMD_PRIVATE_OPTIONS" '
      BEGIN { n = split(private, names, /[ \n]+/); for (i = 1; i <= n; i++) skip[names[i]] = 1 }
      NF && $1 !~ /^#/ && !($1 in skip)
    ' "$BASE_CLAMD_CONF"
  } >"$CLAMD_CONF"
}

# clamd's PONG on its socket (zPING: the NUL-terminated form of the command).
clamd_answers() {
  local py=$PY
  [ -x "$py" ] || py=python3
  "$py" - "$CLAMD_SOCKET" <<'EOF' 2>/dev/null
import socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(2)
    s.connect(sys.argv[1])
    s.sendall(b"zPING\0")
    sys.exit(0 if s.recv(16).startswith(b"PONG") else 1)
EOF
}

clamd_signatures_text() {
  case "$1" in
    "$OFFICIAL_DATABASE") echo "the official ClamAV database in $OFFICIAL_DATABASE" ;;
    *) echo "test signatures only: this clamd finds the project's test signature (the EICAR test file) and nothing else; install the official database with freshclam for real protection" ;;
  esac
}

start_clamd() {
  if [ "$CLAMD_SIGNATURES" = none ]; then
    say "clamd: not started (CLAMD_SIGNATURES=none): mail with attachments is answered 451 (tempfail)"
    return
  fi
  mkdir -p "$CLAMD_DIR"
  [ "${#CLAMD_SOCKET}" -le 100 ] || die "clamd's socket path $CLAMD_SOCKET is too long for a UNIX socket (set LOCAL_STACK_DIR shorter)"
  if running "$VAR/clamd.pid"; then
    say "clamd already running (pid $(cut -d' ' -f1 "$VAR/clamd.pid")): $(cat "$CLAMD_DIR/signatures" 2>/dev/null)"
  elif clamd_answers; then
    say "something already answers on $CLAMD_ADDRESS: not starting another clamd"
    return
  elif [ ! -x "$CLAMD_BIN" ]; then
    say "WARNING: clamd is not installed (apt-get install clamav-daemon; make run does it):"
    say "         mail with attachments is answered 451 4.7.1 (tempfail), as rules/ ask when the"
    say "         virus scanner is down"
    return
  else
    local database
    database=$(clamd_database)
    write_clamd_config "$database"
    clamd_signatures_text "$database" >"$CLAMD_DIR/signatures"
    say "clamd: $(cat "$CLAMD_DIR/signatures")"
    [ "$database" = "$OFFICIAL_DATABASE" ] && say "clamd: loading the official database takes 20-60 s and about 1 GB of memory"
    # setsid: it outlives this script and the terminal; Foreground yes, so $! is clamd.
    setsid "$CLAMD_BIN" --config-file="$CLAMD_CONF" </dev/null >>"$CLAMD_DIR/clamd.out" 2>&1 &
    remember "$VAR/clamd.pid" $!
  fi
  local pid waited=0
  pid=$(cut -d' ' -f1 "$VAR/clamd.pid")
  until clamd_answers; do
    if ! running "$VAR/clamd.pid"; then
      rm -f "$VAR/clamd.pid"
      tail -n 15 "$CLAMD_DIR/clamd.out" >&2 2>/dev/null || true
      die "clamd exited before answering PING: see ${CLAMD_DIR#"$REPO"/}/clamd.out and clamd.log"
    fi
    if [ "$waited" -ge $((CLAMD_START_TIMEOUT * 10)) ]; then
      die "clamd (pid $pid) gave no PONG within $CLAMD_START_TIMEOUT s: see ${CLAMD_DIR#"$REPO"/}/clamd.log"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  say "clamd on $CLAMD_ADDRESS answers PING (pid $pid, log: ${CLAMD_DIR#"$REPO"/}/clamd.log)"
}

# The rules the stack's gateway runs with: rules/ pointed at the private clamd.
write_stack_rules() {
  [ -x "$PY" ] || die "no $PY: run make run (it creates .venv), or set LOCAL_STACK_PYTHON"
  "$PY" "$REPO/bench/scanner_rules.py" --rules "$RULES_SOURCE" --output "$STACK_RULES" \
    --clamd "$CLAMD_ADDRESS" --clamd-conf "$CLAMD_CONF" || die "could not write $STACK_RULES"
  say "rules for the gateway: ${STACK_RULES#"$REPO"/} (rules/ with virus_scan.clamd $CLAMD_ADDRESS)"
}

start_daemon() {
  local cmd=$1
  if running "$VAR/daemon.pid"; then
    # It re-reads its rules on SIGHUP: the copy just written, with any change to rules/.
    kill -HUP "$(cut -d' ' -f1 "$VAR/daemon.pid")" 2>/dev/null || true
    say "gateway already started by this script (pid $(cut -d' ' -f1 "$VAR/daemon.pid"); sent SIGHUP to re-read its rules)"
    return
  fi
  if milter_listening; then
    say "something already listens on $MILTER: not starting another gateway"
    return
  fi
  # From the repository, so a relative rules/ or .venv/ in CMD works.
  # A simple command after `&` (not a list), so $! is the daemon itself: setsid and
  # `bash -c exec` both exec in place.
  (cd "$REPO" || exit 1
   setsid bash -c "exec $cmd" </dev/null >>"$VAR/daemon.log" 2>&1 &
   remember "$VAR/daemon.pid" $!)
  say "gateway started: $cmd (pid $(cut -d' ' -f1 "$VAR/daemon.pid"), log: ${VAR#"$REPO"/}/daemon.log)"
}

# Tenths of a second: a daemon we just started loads its rules first; one the Makefile
# runs is either up already or started after us.
wait_for_milter() {
  for _ in $(seq "$1"); do milter_listening && return 0; sleep 0.1; done
  return 1
}

start() {
  local daemon_cmd=${1:-}
  [ "$(id -u)" -eq 0 ] || die "run as root (Postfix needs it)"
  if ! command -v postfix >/dev/null || [ ! -x /usr/sbin/smtp-sink ]; then
    die "Postfix is not installed: apt-get install postfix swaks (make run does it)"
  fi
  mkdir -p "$VAR"
  write_config "$(data_directory)"
  start_sink
  start_postfix
  # clamd answers before the gateway starts: a message scanned while it still loads would
  # be tempfailed.
  start_clamd
  write_stack_rules
  [ -n "$daemon_cmd" ] && start_daemon "$daemon_cmd"
  if wait_for_milter "$([ -n "$daemon_cmd" ] && echo 300 || echo 20)"; then
    say "gateway listening on $MILTER"
  else
    say "WARNING: nothing listens on $MILTER yet: Postfix answers 451 4.7.1 (try again later)"
    say "         until the gateway runs, e.g. .venv/bin/school-milter --rules ${STACK_RULES#"$REPO"/} serve --milter $MILTER"
  fi
  local delivered=${DELIVERED#"$REPO"/}
  cat <<EOF

Try it (each delivered message appears as a file in $delivered/):
  # clean mail from a member of staff: accepted, tagged with X-School-Policy, delivered
  swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
    --header "Subject: Museum trip on Thursday" --body "Dear parents, please send a packed lunch."
  # obscene mail from a member of staff: refused with 550 5.7.1 citing clause 5.5, not delivered
  swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
    --header "Subject: Re: marking" --body "This marking scheme is f*cking ridiculous."
    # (the sender also gets a guidance mail: it lands in $delivered/ too)
  # obscene mail received from outside: accepted, held in the quarantine, SLT alerted
  swaks --server 127.0.0.1:$SMTP_PORT --from prize@spam.example --to a.patel@redborne.example \\
    --header "Subject: you won" --body "you are a fucking disgrace" \\
    --xclient "ADDR=203.0.113.9 NAME=mail.outside.example"
  # mail with an attachment: virus-scanned by the stack's clamd, clean, delivered
  swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
    --header "Subject: Trip letter" --body "The letter is attached." \\
    --attach-type text/plain --attach-name trip-letter.txt --attach "Please sign and return by Friday."
  # a virus: the EICAR test file (decoded from the project's test signature, never stored as
  # a file) refused with 550 5.7.1 naming the signature; the sender gets guidance, IT an alert
  perl -ne 'print pack "H*", \$1 if /^School\.Test\.EICAR:0:\*:(\w+)/' tests/data/clamav/test-signatures.ndb |
    swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
      --header "Subject: Worksheet" --body "The worksheet is attached." --attach-name worksheet.com --attach -
  .venv/bin/school-milter quarantine list --database sqlite:///$REPO/var/quarantine.db
  ls -t $delivered/ | head; tail ${VAR#"$REPO"/}/maillog
Stop it all: deploy/local-stack.sh stop
EOF
}

stop_pidfile() {
  local pidfile=$1 name=$2 pid
  if running "$pidfile"; then
    pid=$(cut -d' ' -f1 "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    # The gateway drains messages in flight on SIGTERM (shutdown_grace, 30 s by default).
    for _ in $(seq 400); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
    if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    say "$name stopped"
  fi
  rm -f "$pidfile"
}

stop() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  stop_pidfile "$VAR/daemon.pid" "gateway"
  if [ -f "$CONF/main.cf" ] && postfix -c "$CONF" status >/dev/null 2>&1; then
    local master
    master=$(tr -d ' ' <"$QUEUE/pid/master.pid" 2>/dev/null || true)
    postfix -c "$CONF" stop >/dev/null 2>&1 || true
    # `postfix stop` returns before the master is gone.
    for _ in $(seq 100); do
      if [ -z "$master" ] || [ ! -d "/proc/$master" ]; then break; fi
      sleep 0.1
    done
    say "Postfix stopped"
  fi
  stop_pidfile "$VAR/sink.pid" "sink"
  # After the gateway: messages it drains on SIGTERM may still be scanned.
  stop_pidfile "$VAR/clamd.pid" "clamd"
  # A LOCAL_STACK_DIR stack's own fallback data directory (one lock file) goes with it.
  if [ -n "${LOCAL_STACK_DIR:-}" ] && [ -d "$OUTSIDE_DATA" ]; then rm -rf "$OUTSIDE_DATA"; fi
}

status() {
  if running "$VAR/sink.pid"; then say "sink: running (pid $(cut -d' ' -f1 "$VAR/sink.pid"))"
  else say "sink: stopped"; fi
  if [ -f "$CONF/main.cf" ] && postfix -c "$CONF" status >/dev/null 2>&1; then
    say "Postfix: running on 127.0.0.1:$SMTP_PORT"
  else say "Postfix: stopped"; fi
  if running "$VAR/clamd.pid"; then
    if clamd_answers; then say "clamd: running on $CLAMD_ADDRESS (pid $(cut -d' ' -f1 "$VAR/clamd.pid"))"
    else say "clamd: running (pid $(cut -d' ' -f1 "$VAR/clamd.pid")) but not answering PING yet (loading signatures?)"; fi
    say "       $(cat "$CLAMD_DIR/signatures" 2>/dev/null)"
  elif clamd_answers; then say "clamd: something not started by this script answers on $CLAMD_ADDRESS"
  else say "clamd: stopped (mail with attachments is answered 451)"; fi
  if milter_listening; then say "gateway: listening on $MILTER"
  else say "gateway: nothing listens on $MILTER"; fi
  say "delivered: $(find "$DELIVERED" -type f 2>/dev/null | wc -l) message(s) in ${DELIVERED#"$REPO"/}/"
}

action=start
daemon_cmd=""
while [ $# -gt 0 ]; do
  case "$1" in
    start|stop|status) action=$1 ;;
    --with-daemon) [ $# -ge 2 ] || die "--with-daemon needs a command"; daemon_cmd=$2; shift ;;
    --with-daemon=*) daemon_cmd=${1#--with-daemon=} ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (start, stop, status, --with-daemon CMD)" ;;
  esac
  shift
done

case "$action" in
  start) start "$daemon_cmd" ;;
  stop) stop ;;
  status) status ;;
esac
