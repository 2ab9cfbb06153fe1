#!/usr/bin/env bash
# Local development stack: a private Postfix on 127.0.0.1:2525 whose milter is the gateway,
# delivering everything to a sink that writes each message to var/delivered/.
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
#   gateway   NOT started by default: the Makefile starts the daemon. With
#             `--with-daemon CMD` this script starts CMD too (in the background, log in
#             var/local-stack/daemon.log) and stops it on `stop`. Either way, start waits
#             briefly for the milter port and says if nothing listens there: until the
#             gateway runs, Postfix answers 451 4.7.1 (tempfail), it does not pass mail.
#
# Running it twice is harmless: what runs is kept (Postfix re-reads its configuration),
# nothing is started twice. Needs root and `apt-get install postfix swaks`.
# Ports and the milter can be changed: SMTP_PORT=2525 SINK_PORT=2526
# MILTER=inet:127.0.0.1:8894 deploy/local-stack.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$REPO/var/local-stack"
DELIVERED="$REPO/var/delivered"
CONF="$VAR/postfix/conf"
QUEUE="$VAR/postfix/queue"
MAILLOG="$VAR/maillog"
SMTP_PORT="${SMTP_PORT:-2525}"
SINK_PORT="${SINK_PORT:-2526}"
# Released mail, guidance and alerts come back in here: an smtpd with no milter.
REINJECT_PORT="${REINJECT_PORT:-2527}"
MILTER="${MILTER:-inet:127.0.0.1:8894}"
# Fallback data directory, used only when postfix cannot reach var/ (see data_directory()).
OUTSIDE_DATA="/var/lib/school-milter-local-stack"

say() { printf 'local-stack: %s\n' "$*"; }
die() { printf 'local-stack: %s\n' "$*" >&2; exit 1; }

# A pid file holds "PID STARTTIME" (the process start time from /proc/PID/stat), so a
# stale pid file, or a pid the kernel has since given to another program, is never taken
# for ours and never signalled.
start_time() {
  local stat rest fields
  stat=$(<"/proc/$1/stat") 2>/dev/null || return 1
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

start_daemon() {
  local cmd=$1
  if running "$VAR/daemon.pid"; then
    say "gateway already started by this script (pid $(cut -d' ' -f1 "$VAR/daemon.pid"))"
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
  say "gateway started: $cmd (pid $(cut -d' ' -f1 "$VAR/daemon.pid"), log: var/local-stack/daemon.log)"
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
  [ -n "$daemon_cmd" ] && start_daemon "$daemon_cmd"
  if wait_for_milter "$([ -n "$daemon_cmd" ] && echo 300 || echo 20)"; then
    say "gateway listening on $MILTER"
  else
    say "WARNING: nothing listens on $MILTER yet: Postfix answers 451 4.7.1 (try again later)"
    say "         until the gateway runs, e.g. .venv/bin/school-milter serve --milter $MILTER"
  fi
  cat <<EOF

Try it (each delivered message appears as a file in var/delivered/):
  # clean mail from a member of staff: accepted, tagged with X-School-Policy, delivered
  swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
    --header "Subject: Museum trip on Thursday" --body "Dear parents, please send a packed lunch."
  # obscene mail from a member of staff: refused with 550 5.7.1 citing clause 5.5, not delivered
  swaks --server 127.0.0.1:$SMTP_PORT --from j.hughes@redborne.example --to parent@example.org \\
    --header "Subject: Re: marking" --body "This marking scheme is f*cking ridiculous."
    # (the sender also gets a guidance mail: it lands in var/delivered/ too)
  # obscene mail received from outside: accepted, held in the quarantine, SLT alerted
  swaks --server 127.0.0.1:$SMTP_PORT --from prize@spam.example --to a.patel@redborne.example \\
    --header "Subject: you won" --body "you are a fucking disgrace" \\
    --xclient "ADDR=203.0.113.9 NAME=mail.outside.example"
  .venv/bin/school-milter quarantine list --database sqlite:///$REPO/var/quarantine.db
  ls -t var/delivered/ | head; tail var/local-stack/maillog
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
}

status() {
  if running "$VAR/sink.pid"; then say "sink: running (pid $(cut -d' ' -f1 "$VAR/sink.pid"))"
  else say "sink: stopped"; fi
  if [ -f "$CONF/main.cf" ] && postfix -c "$CONF" status >/dev/null 2>&1; then
    say "Postfix: running on 127.0.0.1:$SMTP_PORT"
  else say "Postfix: stopped"; fi
  if milter_listening; then say "gateway: listening on $MILTER"
  else say "gateway: nothing listens on $MILTER"; fi
  say "delivered: $(find "$DELIVERED" -type f 2>/dev/null | wc -l) message(s) in var/delivered/"
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
