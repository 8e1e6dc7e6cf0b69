#!/usr/bin/env bash
# A local single-node Apache Kafka broker (KRaft, combined broker+controller) run from Maven Central jars.
# See `kafka.sh --help`.
set -euo pipefail

KAFKA_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$KAFKA_HOME/pom.xml"
LOG4J_CONFIG="$KAFKA_HOME/log4j2.properties"
PROG="kafka.sh"
READY_LINE="Kafka Server started"
HEAP_OPTS="${QREC_KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
GC_OPTS="-XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent"
JAVA_BIN="${JAVA_HOME:+$JAVA_HOME/bin/}java"

usage() {
    cat <<EOF
Usage: $PROG COMMAND [OPTIONS]

Runs a local single-node Apache Kafka 4.x broker (KRaft mode, one process that is both broker and
controller, listening on 127.0.0.1 only) from jars fetched from Maven Central with Maven.
No Kafka download, ZooKeeper or Docker is needed; Java 17+ and Maven (mvn) must be installed.

Commands:
  fetch
      Copy the broker's jars (listed in deploy/kafka/pom.xml) once into a cache folder; print it.
      The folder is \$QREC_KAFKA_LIBS if set, else ~/.cache/qrec/kafka-libs-<hash of pom.xml>.
      Does nothing when the folder already holds the jars. Needs network access the first time.

  start --dir DIR [--port P] [--controller-port C] [--timeout S] [--override KEY=VALUE]...
        [--owner-pid PID]
      Start a broker in the background with its configuration, data and logs under DIR:
        DIR/server.properties  the broker configuration (written on every start)
        DIR/data/              the Kafka log directory (topics, metadata); kept across restarts
        DIR/logs/server.log    the broker log (the previous run's is kept as server.log.1)
        DIR/logs/kafka.out     the JVM's stdout and stderr
        DIR/kafka.pid          the broker's process id
        DIR/bootstrap          the bootstrap address, 127.0.0.1:P
      Fetches the jars first if needed and formats DIR/data on first use. Waits until the broker
      logs "$READY_LINE" and accepts TCP connections, then prints the bootstrap address as
      the last line of stdout and exits 0. When it fails (the process exits, or S seconds pass) it
      prints the log tails to stderr, kills the process and exits non-zero.
      --port P             client (PLAINTEXT) port; default: the port of the previous run in DIR
                           if it is free, else a free port picked at random
      --controller-port C  KRaft controller port; default picked the same way
      --timeout S          seconds to wait for readiness (default 90)
      --override KEY=VALUE an extra broker property, appended to server.properties (repeatable)
      --owner-pid PID      stop the broker (as stop does) once process PID has exited, checked every
                           2 s; test fixtures pass their own pid so a killed test run leaks no broker
      If a broker already runs from DIR, prints its address and exits 0.

  run --dir DIR [--port P] [--controller-port C] [--override KEY=VALUE]...
      Like start, but runs the broker in the foreground (the shell is replaced by java) for use
      by hand; stop it with Ctrl-C. The log still goes to DIR/logs/server.log.

  stop --dir DIR [--timeout S]
      Stop the broker started from DIR: SIGTERM (a controlled shutdown), wait up to S seconds
      (default 30), then SIGKILL. Does nothing (exit 0) when no broker runs from DIR.

  status --dir DIR
      Print the bootstrap address and exit 0 if a broker runs from DIR, else exit 1.

  -h, --help
      Show this help.

Environment:
  QREC_KAFKA_LIBS       the jar cache folder (see fetch)
  QREC_KAFKA_HEAP_OPTS  the broker's JVM heap options (default: -Xms256m -Xmx768m)
  QREC_KAFKA_JAVA_OPTS  more JVM options for the broker
  JAVA_HOME             the Java installation to use (default: java on PATH)

Example:
  bootstrap=\$($PROG start --dir /tmp/qrec-kafka | tail -n 1)
  ...
  $PROG stop --dir /tmp/qrec-kafka
EOF
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

usage_error() {
    echo "$PROG: $*" >&2
    echo "Run '$PROG --help' for usage." >&2
    exit 2
}

need_python() {
    command -v python3 >/dev/null || die "python3 is needed (to pick free ports); install it"
}

# ---------------------------------------------------------------------------------------------------
# fetch

libs_dir() {
    if [[ -n "${QREC_KAFKA_LIBS:-}" ]]; then
        echo "$QREC_KAFKA_LIBS"
    else
        local hash
        hash="$(sha256sum "$POM" | cut -c1-12)"
        echo "${XDG_CACHE_HOME:-$HOME/.cache}/qrec/kafka-libs-$hash"
    fi
}

has_jars() {
    local dir="$1"
    [[ -f "$dir/.complete" ]] && compgen -G "$dir/kafka_2.13-*.jar" >/dev/null &&
        compgen -G "$dir/log4j-slf4j-impl-*.jar" >/dev/null
}

# Makes sure the jars are in the cache; sets LIBS. Prints progress on stderr only.
ensure_jars() {
    LIBS="$(libs_dir)"
    if has_jars "$LIBS"; then
        return 0
    fi
    command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch the Kafka jars; install it (e.g. apt-get install maven)"
    local parent tmp
    parent="$(dirname "$LIBS")"
    mkdir -p "$parent"
    tmp="$(mktemp -d "$parent/.kafka-libs-tmp.XXXXXX")"
    FETCH_TMP="$tmp"
    trap 'rm -rf "$FETCH_TMP" "$FETCH_TMP.log"' EXIT
    trap 'rm -rf "$FETCH_TMP" "$FETCH_TMP.log"; exit 130' INT TERM HUP
    echo "$PROG: fetching the Kafka jars into $LIBS (once) ..." >&2
    if ! mvn -B -q -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime \
        >"$tmp.log" 2>&1; then
        cat "$tmp.log" >&2
        rm -rf "$tmp" "$tmp.log"
        die "fetching the jars with Maven failed (see above); check network access to Maven Central or ~/.m2/settings.xml"
    fi
    rm -f "$tmp.log"
    compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || {
        rm -rf "$tmp"
        die "Maven ran but copied no kafka_2.13 jar into $tmp; check $POM"
    }
    touch "$tmp/.complete"
    if [[ -e "$LIBS" ]] && ! has_jars "$LIBS"; then
        rm -rf "$LIBS" # a stale, incomplete folder (e.g. made by hand)
    fi
    if ! mv -T "$tmp" "$LIBS" 2>/dev/null; then
        rm -rf "$tmp" # another fetch finished first
        has_jars "$LIBS" || die "could not move the fetched jars into $LIBS"
    fi
    trap - EXIT INT TERM HUP
}

cmd_fetch() {
    [[ $# -eq 0 ]] || usage_error "fetch takes no arguments"
    ensure_jars
    echo "$LIBS"
}

# ---------------------------------------------------------------------------------------------------
# helpers for start / run / stop

DIR=""
PORT=""
CONTROLLER_PORT=""
TIMEOUT=""
OVERRIDES=()
OWNER_PID=""

parse_options() {
    local allowed="$1"
    shift
    while [[ $# -gt 0 ]]; do
        local opt="$1"
        case "$opt" in
        --dir | --port | --controller-port | --timeout | --override | --owner-pid)
            [[ " $allowed " == *" $opt "* ]] || usage_error "option $opt is not accepted here"
            [[ $# -ge 2 ]] || usage_error "option $opt needs a value"
            case "$opt" in
            --dir) DIR="$2" ;;
            --port) PORT="$2" ;;
            --controller-port) CONTROLLER_PORT="$2" ;;
            --timeout) TIMEOUT="$2" ;;
            --override) OVERRIDES+=("$2") ;;
            --owner-pid) OWNER_PID="$2" ;;
            esac
            shift 2
            ;;
        --dir=* | --port=* | --controller-port=* | --timeout=* | --override=* | --owner-pid=*)
            shift
            set -- "${opt%%=*}" "${opt#*=}" "$@" # --opt=value -> --opt value
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) usage_error "unknown argument: $opt" ;;
        esac
    done
    [[ -n "$DIR" ]] || usage_error "--dir DIR is required"
    local p
    for p in "$PORT" "$CONTROLLER_PORT"; do
        [[ -z "$p" || ("$p" =~ ^[0-9]+$ && "$p" -ge 1 && "$p" -le 65535) ]] || usage_error "not a port: $p"
    done
    [[ -z "$TIMEOUT" || "$TIMEOUT" =~ ^[0-9]+$ ]] || usage_error "--timeout wants whole seconds, got: $TIMEOUT"
    [[ -z "$OWNER_PID" || "$OWNER_PID" =~ ^[0-9]+$ ]] || usage_error "--owner-pid wants a process id, got: $OWNER_PID"
    local o
    for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
        [[ "$o" == ?*=* ]] || usage_error "--override wants KEY=VALUE, got: $o"
    done
    DIR="$(realpath -m "$DIR")" # absolute, symlinks resolved: the broker is found by this path
}

# The pid of the broker running from $DIR, or nothing.
running_pid() {
    local pid
    [[ -f "$DIR/kafka.pid" ]] || return 0
    pid="$(cat "$DIR/kafka.pid" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    is_our_broker "$pid" && echo "$pid"
    return 0
}

# True when pid is alive (not a zombie) and is the java process of the broker of $DIR.
is_our_broker() {
    local pid="$1" state cmdline
    [[ -r "/proc/$pid/stat" ]] || return 1
    state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
    [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *"kafka.Kafka $DIR/server.properties"* ]]
}

prop_value() { # prop_value FILE KEY
    [[ -f "$1" ]] || return 0
    sed -n "s/^$2=//p" "$1" | tail -n 1
}

# Prints "PORT CONTROLLER_PORT": the given ports, else the previous run's if free, else random free ones.
choose_ports() {
    local prev_port="" prev_controller=""
    if [[ -f "$DIR/server.properties" ]]; then
        prev_port="$(prop_value "$DIR/server.properties" advertised.listeners | sed -n 's/.*:\([0-9]*\)$/\1/p')"
        prev_controller="$(prop_value "$DIR/server.properties" controller.quorum.voters | sed -n 's/.*:\([0-9]*\)$/\1/p')"
    fi
    python3 - "$PORT" "$CONTROLLER_PORT" "$prev_port" "$prev_controller" <<'PY'
import socket, sys

given_port, given_controller, prev_port, prev_controller = sys.argv[1:5]
held = []

def try_bind(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Java does on Linux
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
    except OSError:
        s.close()
        return None
    held.append(s)
    return s.getsockname()[1]

def choose(given, prev, what, flag):
    if given:
        port = try_bind(int(given))
        if port is None:
            sys.exit(f"kafka.sh: the {what} port 127.0.0.1:{given} is already in use (another broker or "
                     f"program listens there); pass another {flag} or leave it out to pick a free port")
        return port
    if prev and try_bind(int(prev)) is not None:
        return int(prev)
    return try_bind(0)

port = choose(given_port, prev_port, "client", "--port")
controller = choose(given_controller, prev_controller, "controller", "--controller-port")
if port == controller:
    sys.exit("kafka.sh: --port and --controller-port must differ")
print(port, controller)
PY
}

tcp_open() { # tcp_open PORT: true when 127.0.0.1:PORT accepts a connection
    python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

new_cluster_id() { # 16 random bytes, url-safe base64 without padding, not starting with '-'
    python3 -c '
import base64, os
while True:
    cid = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    if not cid.startswith("-"):
        print(cid)
        break'
}

write_properties() {
    local props="$DIR/server.properties" tmp
    tmp="$props.tmp"
    cat >"$tmp" <<EOF
# Written by deploy/kafka/kafka.sh on every start; edits are lost (use --override KEY=VALUE).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DIR/data

# One node: every replication factor is 1, internal topics are small.
num.partitions=1
default.replication.factor=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=2
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=2
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1

# Consumer groups: no initial rebalance delay; short session timeouts allowed (kill tests).
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000

# Compaction and deletion happen within seconds (tests); a small dedupe buffer keeps the heap modest.
log.cleaner.enable=true
log.cleaner.threads=1
log.cleaner.backoff.ms=1000
log.cleaner.dedupe.buffer.size=16777216
log.segment.delete.delay.ms=1000
file.delete.delay.ms=1000
log.retention.check.interval.ms=5000

# Few threads: this is a small local broker.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
    local o
    if [[ ${#OVERRIDES[@]} -gt 0 ]]; then
        echo "" >>"$tmp"
        echo "# --override" >>"$tmp"
        for o in "${OVERRIDES[@]}"; do
            echo "$o" >>"$tmp"
        done
    fi
    mv -f "$tmp" "$props"
}

# Fetches jars, picks ports, writes the config, formats the storage. Sets LIBS, PORT, CONTROLLER_PORT.
prepare() {
    need_python
    command -v "$JAVA_BIN" >/dev/null || die "java is needed (Java 17 or later); install it or set JAVA_HOME"
    local ports
    ports="$(choose_ports)" || exit 1
    read -r PORT CONTROLLER_PORT <<<"$ports"
    ensure_jars
    mkdir -p "$DIR/logs" "$DIR/data"
    [[ -w "$DIR" ]] || die "$DIR is not writable"
    write_properties
    # Keep the previous run's logs; the readiness check then only sees this run's server.log.
    local f
    for f in server.log kafka.out; do
        if [[ -f "$DIR/logs/$f" ]]; then mv -f "$DIR/logs/$f" "$DIR/logs/$f.1"; fi
    done
    if [[ ! -f "$DIR/data/meta.properties" ]]; then
        local cluster_id
        if [[ -s "$DIR/cluster.id" ]]; then
            cluster_id="$(cat "$DIR/cluster.id")"
        else
            cluster_id="$(new_cluster_id)"
            echo "$cluster_id" >"$DIR/cluster.id"
        fi
        if ! "$JAVA_BIN" -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$LOG4J_CONFIG" \
            -Dkafka.logs.dir="$DIR/logs" kafka.tools.StorageTool format -g -t "$cluster_id" \
            -c "$DIR/server.properties" >"$DIR/logs/format.out" 2>&1; then
            cat "$DIR/logs/format.out" >&2
            die "formatting the storage in $DIR/data failed (see above); delete $DIR/data and try again"
        fi
    fi
    echo "127.0.0.1:$PORT" >"$DIR/bootstrap"
}

java_args() {
    # shellcheck disable=SC2206 # word splitting of the option strings is intended
    JAVA_ARGS=($HEAP_OPTS $GC_OPTS -XX:MetaspaceSize=96m -Djava.awt.headless=true ${QREC_KAFKA_JAVA_OPTS:-}
        -Dlog4j2.configurationFile="$LOG4J_CONFIG" -Dkafka.logs.dir="$DIR/logs"
        -cp "$LIBS/*" kafka.Kafka "$DIR/server.properties")
}

report_failure() {
    local why="$1"
    {
        echo "$PROG: $why"
        echo "----- last 60 lines of $DIR/logs/server.log -----"
        tail -n 60 "$DIR/logs/server.log" 2>/dev/null || echo "(no server.log)"
        echo "----- last 60 lines of $DIR/logs/kafka.out (JVM stdout/stderr) -----"
        tail -n 60 "$DIR/logs/kafka.out" 2>/dev/null || echo "(no kafka.out)"
        echo "-----"
    } >&2
}

kill_broker() { # kill_broker PID TIMEOUT: SIGTERM, wait, SIGKILL
    local pid="$1" timeout="$2" waited=0
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]]; do
        if ((waited >= timeout * 10)); then
            echo "$PROG: the broker (pid $pid) did not stop within ${timeout}s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$pid" 2>/dev/null || true # reap it if it is our child
    return 0
}

# Runs in the background: stops the broker once the process OWNER_PID has exited.
watch_owner() {
    local pid="$1"
    set +e
    while kill -0 "$OWNER_PID" 2>/dev/null && is_our_broker "$pid"; do
        sleep 2
    done
    if is_our_broker "$pid"; then
        kill_broker "$pid" 30
        rm -f "$DIR/kafka.pid"
    fi
}

abort_start() {
    echo "$PROG: interrupted; stopping the broker that was starting" >&2
    kill_broker "$STARTING_PID" 5
    rm -f "$DIR/kafka.pid"
    exit 130
}

# ---------------------------------------------------------------------------------------------------
# commands

cmd_start() {
    parse_options "--dir --port --controller-port --timeout --override --owner-pid" "$@"
    local timeout="${TIMEOUT:-90}" pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        local current
        current="$(cat "$DIR/bootstrap")"
        if [[ -n "$PORT" && "$current" != "127.0.0.1:$PORT" ]]; then
            die "a broker (pid $pid) already runs from $DIR at $current; stop it first ($PROG stop --dir $DIR)"
        fi
        echo "$PROG: a broker (pid $pid) already runs from $DIR" >&2
        echo "$current"
        return 0
    fi
    prepare
    java_args
    # All fds redirected: the broker must not hold the caller's pipes open.
    "$JAVA_BIN" "${JAVA_ARGS[@]}" </dev/null >"$DIR/logs/kafka.out" 2>&1 &
    pid=$!
    echo "$pid" >"$DIR/kafka.pid"
    # If this script is interrupted while waiting, do not leave a half-started broker behind.
    STARTING_PID="$pid"
    trap abort_start INT TERM HUP

    local start_s=$SECONDS status
    while true; do
        if ! kill -0 "$pid" 2>/dev/null || [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == "Z" ]]; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            rm -f "$DIR/kafka.pid"
            report_failure "the broker process exited with status $status before it was ready"
            die "the broker did not start. Read the log above; if a port is in use pass another --port (or none), if the data in $DIR/data is damaged delete it, then run '$PROG start --dir $DIR' again"
        fi
        if grep -q "$READY_LINE" "$DIR/logs/server.log" 2>/dev/null && tcp_open "$PORT"; then
            break
        fi
        if ((SECONDS - start_s >= timeout)); then
            report_failure "the broker was not ready within ${timeout}s"
            kill_broker "$pid" 10
            rm -f "$DIR/kafka.pid"
            die "the broker did not start in time. Read the log above; on a slow or busy machine pass a larger --timeout, then run '$PROG start --dir $DIR' again"
        fi
        sleep 0.2
    done
    trap - INT TERM HUP
    if [[ -n "$OWNER_PID" ]]; then
        watch_owner "$pid" </dev/null >/dev/null 2>&1 &
    fi
    echo "$PROG: broker ready in $((SECONDS - start_s))s (pid $pid, logs in $DIR/logs)" >&2
    echo "127.0.0.1:$PORT"
}

cmd_run() {
    parse_options "--dir --port --controller-port --override" "$@"
    local pid
    pid="$(running_pid)"
    [[ -z "$pid" ]] || die "a broker (pid $pid) already runs from $DIR; stop it first ($PROG stop --dir $DIR)"
    prepare
    java_args
    echo "$$" >"$DIR/kafka.pid"
    echo "$PROG: starting the broker at 127.0.0.1:$PORT in the foreground (Ctrl-C stops it)" >&2
    echo "$PROG: log: $DIR/logs/server.log" >&2
    exec "$JAVA_BIN" "${JAVA_ARGS[@]}"
}

cmd_stop() {
    parse_options "--dir --timeout" "$@"
    local timeout="${TIMEOUT:-30}" pid
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        rm -f "$DIR/kafka.pid"
        echo "$PROG: no broker runs from $DIR" >&2
        return 0
    fi
    kill_broker "$pid" "$timeout"
    rm -f "$DIR/kafka.pid"
    echo "$PROG: stopped the broker (pid $pid)" >&2
}

cmd_status() {
    parse_options "--dir" "$@"
    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]]; then
        cat "$DIR/bootstrap"
        return 0
    fi
    echo "$PROG: no broker runs from $DIR" >&2
    return 1
}

main() {
    [[ $# -gt 0 ]] || {
        usage >&2
        exit 2
    }
    local cmd="$1"
    shift
    case "$cmd" in
    fetch) cmd_fetch "$@" ;;
    start) cmd_start "$@" ;;
    run) cmd_run "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    -h | --help | help) usage ;;
    *) usage_error "unknown command: $cmd" ;;
    esac
}

main "$@"
