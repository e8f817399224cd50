#!/usr/bin/env bash
# bench/load.sh — load test: whydenied against nginx, on loopback only.
#
# Cases, all in front of the same upstream (an nginx answering
# /ok -> 200 "hello from upstream" and /denied -> 403 "Forbidden"):
#   direct              load generator -> upstream /ok
#   nginx               load generator -> nginx proxy_pass -> upstream /ok
#   nginx /denied       the same, /denied (the 403 passes through untouched)
#   hyper alone         load generator -> examples/bare_proxy -> upstream /ok
#                       (hyper's HTTP/1 server and client and nothing else:
#                       the share of the gap to nginx that is the library)
#   whydenied pass      load generator -> whydenied serve -> upstream /ok
#   whydenied denial    the same, /denied (whydenied explains the 403)
#
# Each case gets: a warm-up; a saturation run (wrk, closed loop, many
# connections); a light-load run (oha at a fixed rate with latency
# correction, or — when oha is not available — wrk with one connection);
# and a 256-connection run after which the proxy's peak RSS (VmHWM) is read.
# Before any load, each proxy's RSS is also read with 256 connections open
# at once (one request each).
#
# Output: Markdown on stdout, also written to bench/results.md. Progress
# goes to stderr. Every process it starts is stopped on exit.
#
# Usage:  bench/load.sh                      (from anywhere)
# Knobs (environment):
#   DURATION=10s        saturation run length (wrk -d)
#   LIGHT_DURATION=     light-load run length (default: DURATION)
#   RSS_DURATION=5s     256-connection run length
#   WARMUP=2s           warm-up before each case (0 to skip)
#   THREADS=2 CONNS=64  saturation run: wrk -t THREADS -c CONNS
#   RSS_CONNS=256       connections of the peak-RSS run
#   RATE=1000           light load: fixed request rate (req/s), oha only
#   LIGHT_CONNS=8       light load: oha connections
#   LIGHT=auto          auto | oha | wrk (wrk = 1-connection closed loop)
#   UPSTREAM_WORKERS=1  nginx worker_processes of the upstream
#   REPEAT=1            saturation runs per case; the median (by req/s) is
#                       reported, with the range
#   PIN=0               1: load generators on CPU 0, the servers (upstream,
#                       nginx, bare_proxy, whydenied) on the other CPUs
#                       (taskset); steadier numbers, and each proxy gets the
#                       same CPU budget
#   SKIP_WHYDENIED=1    leave out the whydenied rows
#   SKIP_BARE=1         leave out the "hyper alone" row (with SKIP_WHYDENIED=1:
#                       direct and nginx only)
#   NO_BUILD=1          never run cargo build (by default it runs, and does
#                       nothing when the binaries are up to date); the
#                       whydenied rows, or the "hyper alone" row, are skipped
#                       when the binary is missing, and the report flags a
#                       binary older than the sources
#   NO_INSTALL=1        never apt-get/cargo install missing tools
#   WHYDENIED_BIN=      binary to run, as it is (default: the one cargo
#                       builds, target/release/whydenied)
#   WHYDENIED_RUST_LOG= RUST_LOG for whydenied (default: unset = its default)
#   WHYDENIED_WORKERS=  whydenied's runtime threads (1 = one thread, like
#                       nginx's one worker; default: one per core); the
#                       "hyper alone" proxy reads it too
#   RESULTS=bench/results.md   where the Markdown goes ('' = stdout only)
#   KEEP_TMP=1          keep the temp dir (configs, logs, raw outputs; it is
#                       also kept when the run fails)
# Relative paths are relative to the repository root.
#
# Missing tools are installed: wrk, nginx (and curl, python3) with apt-get;
# oha with `cargo install oha --locked` into ~/.cargo/bin — a one-time build
# of about 4-5 minutes on 2 cores (LIGHT=wrk avoids it). With the tools in
# place, a default run takes a little over 2 minutes.
set -Eeuo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=$ROOT/bench

DURATION=${DURATION:-10s}
LIGHT_DURATION=${LIGHT_DURATION:-$DURATION}
RSS_DURATION=${RSS_DURATION:-5s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
RSS_CONNS=${RSS_CONNS:-256}
RATE=${RATE:-1000}
LIGHT_CONNS=${LIGHT_CONNS:-8}
LIGHT=${LIGHT:-auto}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-1}
REPEAT=${REPEAT:-1}
PIN=${PIN:-0}
SKIP_WHYDENIED=${SKIP_WHYDENIED:-0}
SKIP_BARE=${SKIP_BARE:-0}
NO_BUILD=${NO_BUILD:-0}
NO_INSTALL=${NO_INSTALL:-0}
WD_GIVEN=0
[[ -n ${WHYDENIED_BIN:-} ]] && WD_GIVEN=1
WHYDENIED_BIN=${WHYDENIED_BIN:-${CARGO_TARGET_DIR:-target}/release/whydenied}
BARE_BIN=${CARGO_TARGET_DIR:-target}/release/examples/bare_proxy
RESULTS=${RESULTS-bench/results.md}
KEEP_TMP=${KEEP_TMP:-0}
WRK_TIMEOUT=${WRK_TIMEOUT:-5s}

log() { printf '[load.sh] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for v in DURATION LIGHT_DURATION RSS_DURATION; do
  [[ ${!v} =~ ^[1-9][0-9]*[smh]?$ ]] || die "$v=${!v}: want e.g. 10s, 2m"
done
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "WARMUP=$WARMUP: want e.g. 2s or 0"
for v in THREADS CONNS RSS_CONNS RATE LIGHT_CONNS UPSTREAM_WORKERS REPEAT; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: want a positive integer"
done
(( CONNS >= THREADS && RSS_CONNS >= THREADS )) || die "CONNS and RSS_CONNS must be >= THREADS"
case $LIGHT in auto | oha | wrk) ;; *) die "LIGHT=$LIGHT: want auto, oha or wrk" ;; esac

# CPU pinning (PIN=1): prefixes for the load generators and the servers.
GEN_PIN=() SRV_PIN=() PIN_NOTE=
if [[ $PIN == 1 ]]; then
  NCPU=$(nproc)
  ((NCPU >= 2)) || die "PIN=1 needs at least 2 CPUs"
  command -v taskset >/dev/null || die "PIN=1 needs taskset (util-linux)"
  GEN_PIN=(taskset -c 0) SRV_PIN=(taskset -c "1-$((NCPU - 1))")
  PIN_NOTE="load generators pinned to CPU 0, servers to CPU(s) 1-$((NCPU - 1))"
fi

# ---------------------------------------------------------------- tools ----

as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"
  fi
}

find_nginx() {
  local c
  for c in "$(command -v nginx 2>/dev/null || true)" /usr/sbin/nginx /usr/local/sbin/nginx /usr/local/nginx/sbin/nginx; do
    [[ -n $c && -x $c ]] && { printf '%s\n' "$c"; return 0; }
  done
  return 1
}

install_tools() {
  local pkgs=()
  command -v wrk >/dev/null || pkgs+=(wrk)
  find_nginx >/dev/null || pkgs+=(nginx)
  command -v curl >/dev/null || pkgs+=(curl)
  command -v python3 >/dev/null || pkgs+=(python3)
  command -v awk >/dev/null || pkgs+=(mawk)
  ((${#pkgs[@]} == 0)) && return 0
  [[ $NO_INSTALL == 1 ]] && die "missing: ${pkgs[*]} (NO_INSTALL=1)"
  command -v apt-get >/dev/null || die "missing: ${pkgs[*]}, and no apt-get to install them"
  log "installing from Debian: ${pkgs[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
}

OHA=
find_oha() {
  local c
  for c in "$(command -v oha 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/oha"; do
    [[ -n $c && -x $c ]] && { OHA=$c; return 0; }
  done
  return 1
}

# oha is the fixed-rate load generator (wrk cannot hold a rate, and wrk2 is
# not packaged in Debian). It is on crates.io only: ~3-4 minutes to build on
# 2 cores, once; after that it is in ~/.cargo/bin.
install_oha() {
  find_oha && return 0
  [[ $LIGHT == wrk ]] && return 1
  if [[ $NO_INSTALL == 1 ]] || ! command -v cargo >/dev/null; then
    [[ $LIGHT == oha ]] && die "LIGHT=oha but oha is missing (cargo install oha --locked)"
    return 1
  fi
  log "building oha from crates.io for the fixed-rate runs (once; a few minutes)"
  if (cd "$TMP" && timeout 900 cargo install oha --locked --target-dir "$TMP/oha-target") >"$TMP/oha-install.log" 2>&1; then
    rm -rf "$TMP/oha-target"
    find_oha && return 0
  fi
  rm -rf "$TMP/oha-target"
  [[ $LIGHT == oha ]] && die "cargo install oha failed; see $TMP/oha-install.log"
  log "warning: cargo install oha failed; light load falls back to wrk -c1 (tail: $(tail -n 3 "$TMP/oha-install.log" | tr '\n' ' '))"
  return 1
}

# ------------------------------------------------------------ processes ----

TMP=$(mktemp -d "${TMPDIR:-/tmp}/whydenied-bench.XXXXXX")
# nginx workers drop to `nobody` when started as root; let them reach TMP.
chmod 755 "$TMP"
PIDS=()

children_of() { # direct children of $1 (needs /proc/PID/task/*/children)
  cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' || true
}

alive() { kill -0 "$1" 2>/dev/null; }

stop_all() {
  local pid kid i all=()
  for pid in "${PIDS[@]}"; do
    alive "$pid" || continue
    all+=("$pid")
    for kid in $(children_of "$pid"); do all+=("$kid"); done
  done
  ((${#all[@]} == 0)) && return 0
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((i = 0; i < 50; i++)); do # at most 5 s for a graceful stop
    local left=0
    for pid in "${all[@]}"; do alive "$pid" && left=1; done
    ((left)) || break
    sleep 0.1
  done
  for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_all
  if [[ $KEEP_TMP == 1 || $rc -ne 0 ]]; then
    log "temp dir kept: $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
trap 'log "interrupted"; exit 130' INT TERM

# Free loopback ports, all different, picked in one go.
pick_ports() { # N
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}

# Wait (bounded) until URL answers with the expected status.
wait_http() { # URL STATUS PID LOG
  local url=$1 want=$2 pid=$3 logf=$4 i code
  for ((i = 0; i < 100; i++)); do # at most ~10-20 s
    alive "$pid" || { tail -n 20 "$logf" >&2 || true; die "process $pid died while starting ($url)"; }
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)
    [[ $code == "$want" ]] && return 0
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 || true
  die "$url did not answer $want in time (last: ${code:-none})"
}

start_nginx() { # NAME TEMPLATE PORT [UPSTREAM_PORT] -> sets NGINX_PID
  local name=$1 tmpl=$2 port=$3 up=${4:-}
  local conf=$TMP/$name.conf
  sed -e "s|@TMP@|$TMP|g" -e "s|@PORT@|$port|g" -e "s|@UPSTREAM_PORT@|$up|g" \
    -e "s|@WORKERS@|$UPSTREAM_WORKERS|g" "$tmpl" >"$conf"
  "$NGINX" -p "$TMP" -e "$TMP/$name-error.log" -t -c "$conf" >"$TMP/$name-test.log" 2>&1 ||
    { cat "$TMP/$name-test.log" >&2; die "nginx config $conf is invalid"; }
  "${SRV_PIN[@]}" "$NGINX" -p "$TMP" -e "$TMP/$name-error.log" -c "$conf" >"$TMP/$name.out" 2>&1 &
  NGINX_PID=$!
  PIDS+=("$NGINX_PID")
}

nginx_workers() { children_of "$1"; }

# ---------------------------------------------------------- measurement ----

CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { # PID... -> summed utime+stime of the given processes
  local pid total=0 stat rest f
  for pid in "$@"; do
    stat=$(cat /proc/"$pid"/stat 2>/dev/null) || continue
    rest=${stat##*) } # fields from 3 on; comm may contain spaces
    read -ra f <<<"$rest"
    total=$((total + f[11] + f[12])) # utime, stime (fields 14, 15)
  done
  echo "$total"
}

now_ns() { date +%s%N; }

# Reset VmHWM (peak RSS) to the current RSS, so each case has its own peak.
CLEAR_REFS_OK=1
reset_peak() {
  local pid
  for pid in "$@"; do
    echo 5 >/proc/"$pid"/clear_refs 2>/dev/null || CLEAR_REFS_OK=0
  done
}

kib_of() { # FIELD PID... -> max of that /proc/PID/status field (kB)
  local field=$1 pid v max=0
  shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f { print $2 }' /proc/"$pid"/status 2>/dev/null || true)
    [[ -n $v ]] && ((v > max)) && max=$v
  done
  echo "$max"
}

mib() { awk -v k="$1" 'BEGIN { if (k > 0) printf "%.1f MiB", k / 1024; else printf "—" }'; }

# Latency in microseconds -> "123 µs" / "1.23 ms".
fmt_us() {
  awk -v u="$1" 'BEGIN {
    if (u == "" || u < 0) { printf "—"; exit }
    if (u < 1000) printf "%d µs", u + 0.5
    else if (u < 100000) printf "%.2f ms", u / 1000
    else printf "%.0f ms", u / 1000 }'
}

ratio() { # A B -> "0.87×"
  awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0 && b > 0) printf "%.2f×", a / b; else printf "—" }'
}

# Parse a WRK_RESULT line into R_* variables.
parse_wrk() { # FILE EXPECT(2xx|403)
  local line kv k v
  line=$(grep -m1 '^WRK_RESULT ' "$1") || { cat "$1" >&2; die "no WRK_RESULT in $1"; }
  R_requests=0 R_duration_us=1 R_p50_us=-1 R_p99_us=-1 R_connect=0 R_read=0 R_write=0
  R_timeout=0 R_non2xx3xx=0 R_codes=none
  for kv in ${line#WRK_RESULT }; do
    k=${kv%%=*} v=${kv#*=}
    printf -v "R_$k" '%s' "$v"
  done
  R_rps=$(awk -v n="$R_requests" -v d="$R_duration_us" 'BEGIN { printf "%.0f", n / (d / 1e6) }')
  local sock=$((R_connect + R_read + R_write + R_timeout)) bad
  if [[ $2 == 403 ]]; then
    local got403
    got403=$(tr ',' '\n' <<<"$R_codes" | awk -F: '$1 == 403 { print $2 }')
    bad=$((R_requests - ${got403:-0}))
  else
    bad=$R_non2xx3xx
  fi
  R_errors=$((sock + bad))
  if ((R_errors == 0)); then
    R_errors_txt="0"
  else
    R_errors_txt="$R_errors (status: $bad, socket: $sock; codes $R_codes)"
  fi
  if [[ $2 == 403 && $bad -eq 0 ]]; then R_errors_txt="0 (all $R_requests were 403)"; fi
}

run_wrk() { # OUTFILE THREADS CONNS DURATION URL
  local out=$1 t=$2 c=$3 d=$4 url=$5
  "${GEN_PIN[@]}" wrk -t"$t" -c"$c" -d"$d" --timeout "$WRK_TIMEOUT" -s "$BENCH/stats.lua" "$url" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed ($url)"; }
}

# Parse oha's JSON into R_* variables.
parse_oha() { # FILE EXPECT(2xx|403)
  local vals
  vals=$(python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
errs = sum((d.get("errorDistribution") or {}).values())
n = sum(codes.values())
if sys.argv[2] == "403":
    bad = n - codes.get(403, 0)
else:
    bad = sum(v for k, v in codes.items() if not 200 <= k < 400)
p = d.get("latencyPercentiles") or {}
us = lambda x: -1 if x is None else round(x * 1e6)
code_txt = ",".join(f"{k}:{v}" for k, v in sorted(codes.items())) or "none"
print(round(s.get("requestsPerSec") or 0), us(p.get("p50")), us(p.get("p99")),
      n, bad, errs, code_txt)
PY
  ) || { head -c 2000 "$1" >&2; die "cannot parse oha output $1"; }
  read -r R_rps R_p50_us R_p99_us R_requests bad sock R_codes <<<"$vals"
  R_errors=$((bad + sock))
  if ((R_errors == 0)); then
    R_errors_txt="0"
    if [[ $2 == 403 ]]; then R_errors_txt="0 (all $R_requests were 403)"; fi
  else
    R_errors_txt="$R_errors (status: $bad, socket/other: $sock; codes $R_codes)"
  fi
}

run_oha() { # OUTFILE URL
  "${GEN_PIN[@]}" "$OHA" -z "$LIGHT_DURATION" -q "$RATE" -c "$LIGHT_CONNS" --latency-correction -w \
    --no-tui --output-format json "$2" >"$1" 2>"$1.err" ||
    { cat "$1.err" >&2; die "oha failed ($2)"; }
}

# Connections the upstream has accepted so far (nginx stub_status), or ''.
upstream_accepts() {
  { curl -s --max-time 2 "http://127.0.0.1:$UP_PORT/nginx_status" || true; } |
    awk 'NR == 3 && $1 ~ /^[0-9]+$/ { print $1 }'
}

# Upstream connections opened between two readings (the second reading's own
# connection excluded).
conns_between() { # BEFORE AFTER
  if [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ ]]; then echo $(($2 - $1 - 1)); else echo "—"; fi
}

# One case: warm-up, saturation, light load, optional peak-RSS run.
# PROCS: the processes doing the proxying (for CPU and RSS), may be empty.
declare -A RES
CASES=()
run_case() { # KEY LABEL URL EXPECT RSS(0|1) PID...
  local key=$1 label=$2 url=$3 expect=$4 rss=$5
  shift 5
  local procs=("$@")
  CASES+=("$key")
  RES[$key.label]=$label
  RES[$key.expect]=$expect

  local code
  code=$(curl -s -o "$TMP/$key.body" -w '%{http_code}' --max-time 5 "$url" || true)
  [[ $code == "$expect" || ($expect == 2xx && $code =~ ^[23]) ]] ||
    die "$label: $url answered ${code:-nothing}, expected $expect"

  if [[ $WARMUP != 0 && $WARMUP != 0[smh] ]]; then
    log "$label: warm-up $WARMUP"
    run_wrk "$TMP/$key.warmup" "$THREADS" "$CONNS" "$WARMUP" "$url"
  fi

  # Saturation, REPEAT times; the run with the median req/s is reported.
  local i t0 c0 a0 t1 c1 a1 cpu upc
  : >"$TMP/$key.sat.list"
  for ((i = 1; i <= REPEAT; i++)); do
    log "$label: saturation, wrk -t$THREADS -c$CONNS -d$DURATION$( ((REPEAT > 1)) && echo " (run $i of $REPEAT)")"
    a0=$(upstream_accepts)
    t0=$(now_ns)
    c0=$(cpu_ticks "${procs[@]}")
    run_wrk "$TMP/$key.sat.$i" "$THREADS" "$CONNS" "$DURATION" "$url"
    c1=$(cpu_ticks "${procs[@]}")
    t1=$(now_ns)
    a1=$(upstream_accepts)
    parse_wrk "$TMP/$key.sat.$i" "$expect"
    cpu="—"
    if ((${#procs[@]})); then
      cpu=$(awk -v c=$((c1 - c0)) -v hz="$CLK_TCK" -v ns=$((t1 - t0)) \
        'BEGIN { printf "%.2f", (c / hz) / (ns / 1e9) }')
    fi
    printf '%s %s %s %s\n' "$R_rps" "$i" "$cpu" "$(conns_between "$a0" "$a1")" >>"$TMP/$key.sat.list"
  done
  read -r _ i cpu upc < <(sort -n "$TMP/$key.sat.list" | awk -v m=$(((REPEAT + 1) / 2)) 'NR == m')
  parse_wrk "$TMP/$key.sat.$i" "$expect"
  RES[$key.sat.rps]=$R_rps RES[$key.sat.p50]=$R_p50_us RES[$key.sat.p99]=$R_p99_us
  RES[$key.sat.err]=$R_errors_txt RES[$key.sat.cpu]=$cpu RES[$key.sat.upc]=$upc
  RES[$key.sat.range]=
  if ((REPEAT > 1)); then
    RES[$key.sat.range]=$(sort -n "$TMP/$key.sat.list" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf " (%d–%d)", lo, hi }')
  fi

  if [[ -n $OHA ]]; then
    log "$label: light load, oha -q $RATE -c $LIGHT_CONNS -z $LIGHT_DURATION (fixed rate)"
    run_oha "$TMP/$key.light.json" "$url"
    parse_oha "$TMP/$key.light.json" "$expect"
  else
    log "$label: light load, wrk -t1 -c1 -d$LIGHT_DURATION (closed loop)"
    run_wrk "$TMP/$key.light" 1 1 "$LIGHT_DURATION" "$url"
    parse_wrk "$TMP/$key.light" "$expect"
  fi
  RES[$key.light.rps]=$R_rps RES[$key.light.p50]=$R_p50_us RES[$key.light.p99]=$R_p99_us
  RES[$key.light.err]=$R_errors_txt

  RES[$key.rss]=0 RES[$key.idle]=0
  if [[ $rss == 1 ]] && ((${#procs[@]})); then
    RES[$key.idle]=$(kib_of VmRSS "${procs[@]}")
    reset_peak "${procs[@]}"
    log "$label: $RSS_CONNS connections, wrk -t$THREADS -c$RSS_CONNS -d$RSS_DURATION"
    a0=$(upstream_accepts)
    run_wrk "$TMP/$key.c256" "$THREADS" "$RSS_CONNS" "$RSS_DURATION" "$url"
    a1=$(upstream_accepts)
    RES[$key.c256.upc]=$(conns_between "$a0" "$a1")
    RES[$key.rss]=$(kib_of VmHWM "${procs[@]}")
    parse_wrk "$TMP/$key.c256" "$expect"
    RES[$key.c256.rps]=$R_rps RES[$key.c256.p50]=$R_p50_us RES[$key.c256.p99]=$R_p99_us
    RES[$key.c256.err]=$R_errors_txt
  fi
}

# ----------------------------------------------------------------- main ----

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOADAVG_START%% *}" 'BEGIN { exit !(l > 0.5) }'; then
  log "warning: load average is $LOADAVG_START before the run; other work on this machine skews the numbers"
fi

install_tools
NGINX=$(find_nginx) || die "nginx not found"
command -v wrk >/dev/null || die "wrk not found"

OHA=
if [[ $LIGHT != wrk ]]; then install_oha || OHA=; fi

# Whether a binary's sources changed after it was built.
older_than_sources() { # BIN
  [[ -n $(find src examples Cargo.toml Cargo.lock -newer "$1" -print -quit 2>/dev/null) ]]
}

# Whether a binary's rows run (PREP_OK=1), and why not or what to beware of
# (PREP_NOTE). Unless NO_BUILD=1 or the binary was given by path (GIVEN=1),
# cargo builds it: a no-op when it is up to date, so a run never measures
# code older than the tree by accident.
prepare_bin() { # SKIP_KNOB BIN WHAT GIVEN CARGO_TARGET_ARGS...
  local knob=$1 bin=$2 what=$3 given=$4
  shift 4
  PREP_OK=0 PREP_NOTE=
  if [[ ${!knob} == 1 ]]; then
    PREP_NOTE="$what skipped ($knob=1)."
  elif [[ $given == 1 || $NO_BUILD == 1 ]]; then
    if [[ ! -x $bin ]]; then
      PREP_NOTE="$what skipped: $bin is missing$([[ $given == 1 ]] || echo " and NO_BUILD=1")."
    else
      PREP_OK=1
      if [[ $given == 0 ]] && older_than_sources "$bin"; then
        PREP_NOTE="$what: $bin is older than the sources (NO_BUILD=1), so it may not be this tree's code."
      fi
    fi
  else
    command -v cargo >/dev/null || die "there is no cargo to build $bin (NO_BUILD=1 uses the binary as it is)"
    log "building: cargo build --release --locked $*"
    cargo build --release --locked "$@" >&2
    [[ -x $bin ]] || die "cargo build finished but $bin is missing"
    PREP_OK=1
  fi
  if [[ -n $PREP_NOTE ]]; then log "$PREP_NOTE"; fi
}
prepare_bin SKIP_WHYDENIED "$WHYDENIED_BIN" "whydenied rows" "$WD_GIVEN" --bin whydenied
WD=$PREP_OK WD_NOTE=$PREP_NOTE
# The example links the library and the dev-dependencies: on a fresh tree
# its first release build also compiles those (criterion, rcgen, axum, ...).
prepare_bin SKIP_BARE "$BARE_BIN" '"hyper alone" row' 0 --example bare_proxy
BARE=$PREP_OK BARE_NOTE=$PREP_NOTE

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

read -r UP_PORT PROXY_PORT WD_PORT ADMIN_PORT BARE_PORT <<<"$(pick_ports 5)"
[[ -n $BARE_PORT ]] || die "could not pick free ports"
log "ports: upstream $UP_PORT, nginx proxy $PROXY_PORT, whydenied $WD_PORT (admin $ADMIN_PORT), hyper alone $BARE_PORT; temp $TMP"

start_nginx upstream "$BENCH/nginx-upstream.conf.tmpl" "$UP_PORT"
UP_PID=$NGINX_PID
wait_http "http://127.0.0.1:$UP_PORT/ok" 200 "$UP_PID" "$TMP/upstream-error.log"
mapfile -t UP_WORKERS < <(nginx_workers "$UP_PID")

start_nginx proxy "$BENCH/nginx-proxy.conf.tmpl" "$PROXY_PORT" "$UP_PORT"
PROXY_PID=$NGINX_PID
wait_http "http://127.0.0.1:$PROXY_PORT/ok" 200 "$PROXY_PID" "$TMP/proxy-error.log"
mapfile -t PROXY_WORKERS < <(nginx_workers "$PROXY_PID")
((${#PROXY_WORKERS[@]})) || die "no nginx proxy worker found under pid $PROXY_PID"

if ((WD)); then
  WD_CONF=$TMP/whydenied-bench.yaml
  { cat "$BENCH/whydenied-bench.yaml"; printf '\nadmin: { listen: "127.0.0.1:%s" }\n' "$ADMIN_PORT"; } >"$WD_CONF"
  "$WHYDENIED_BIN" check --config "$WD_CONF" >"$TMP/whydenied-check.log" 2>&1 ||
    { cat "$TMP/whydenied-check.log" >&2; die "whydenied check rejected $WD_CONF"; }
  if [[ -n ${WHYDENIED_RUST_LOG:-} ]]; then export RUST_LOG=$WHYDENIED_RUST_LOG; fi
  "${SRV_PIN[@]}" "$WHYDENIED_BIN" serve --config "$WD_CONF" --listen "127.0.0.1:$WD_PORT" \
    --upstream "http://127.0.0.1:$UP_PORT" >"$TMP/whydenied.log" 2>&1 &
  WD_PID=$!
  PIDS+=("$WD_PID")
  wait_http "http://127.0.0.1:$WD_PORT/ok" 200 "$WD_PID" "$TMP/whydenied.log"
  # The denial must come back explained, not as the upstream's own body.
  code=$(curl -s -o "$TMP/wd-denied.body" -w '%{http_code}' --max-time 5 "http://127.0.0.1:$WD_PORT/denied" || true)
  [[ $code == 403 ]] || die "whydenied answered /denied with ${code:-nothing}, expected 403"
  if [[ "$(cat "$TMP/wd-denied.body")" == "Forbidden" ]]; then
    die "whydenied passed the upstream's 403 body through unexplained; check $WD_CONF"
  fi
fi

if ((BARE)); then
  # WHYDENIED_WORKERS, if set, reaches it from the environment as it reaches
  # whydenied.
  "${SRV_PIN[@]}" "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT" >"$TMP/bare_proxy.log" 2>&1 &
  BARE_PID=$!
  PIDS+=("$BARE_PID")
  wait_http "http://127.0.0.1:$BARE_PORT/ok" 200 "$BARE_PID" "$TMP/bare_proxy.log"
fi

# RSS with RSS_CONNS connections open at once on a fresh proxy: every
# connection sends one request, all answers are read, the connections stay
# open while RSS is read (the "RSS at 256 open connections" figure; the
# 256-connection wrk run below reports the peak under saturation instead).
open_conns_rss() { # PORT PID... -> kB
  local port=$1
  shift
  python3 - "$port" "$RSS_CONNS" "$@" <<'PY'
import socket, sys, time
port, n, pids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /ok HTTP/1.1\r\nHost: bench\r\n\r\n")
    socks.append(s)
for s in socks:
    s.recv(65536)
time.sleep(0.3)
peak = 0
for pid in pids:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            peak = max(peak, int(line.split()[1]))
print(peak)
for s in socks:
    s.close()
PY
}
log "RSS with $RSS_CONNS open connections (fresh processes)"
RES[nginx.open]=$(open_conns_rss "$PROXY_PORT" "${PROXY_WORKERS[@]}")
((BARE)) && RES[bare.open]=$(open_conns_rss "$BARE_PORT" "$BARE_PID")
((WD)) && RES[wdpass.open]=$(open_conns_rss "$WD_PORT" "$WD_PID")

BASE="http://127.0.0.1"
run_case direct "direct (upstream)" "$BASE:$UP_PORT/ok" 2xx 0 "${UP_WORKERS[@]}"
run_case nginx "nginx proxy" "$BASE:$PROXY_PORT/ok" 2xx 1 "${PROXY_WORKERS[@]}"
run_case nginx403 "nginx proxy, 403" "$BASE:$PROXY_PORT/denied" 403 1 "${PROXY_WORKERS[@]}"
if ((BARE)); then
  run_case bare "hyper alone (examples/bare_proxy)" "$BASE:$BARE_PORT/ok" 2xx 1 "$BARE_PID"
  alive "$BARE_PID" || die "bare_proxy died during the run; see $TMP/bare_proxy.log"
fi
if ((WD)); then
  WD_LOG_BEFORE=$(stat -c %s "$TMP/whydenied.log")
  run_case wdpass "whydenied pass-through" "$BASE:$WD_PORT/ok" 2xx 1 "$WD_PID"
  run_case wddeny "whydenied denial" "$BASE:$WD_PORT/denied" 403 1 "$WD_PID"
  WD_LOG_BYTES=$(($(stat -c %s "$TMP/whydenied.log") - WD_LOG_BEFORE))
  alive "$WD_PID" || die "whydenied died during the run; see $TMP/whydenied.log"
fi
for p in "$UP_PID" "$PROXY_PID"; do alive "$p" || die "an nginx died during the run"; done

# --------------------------------------------------------------- report ----

baseline_of() { # proxy rows compare with the nginx row of the same response
  case $1 in bare | wdpass) echo nginx ;; wddeny) echo nginx403 ;; *) echo "" ;; esac
}

report() {
  local k b light_title
  local cpu_model
  cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null || true)
  echo "# whydenied load test"
  echo
  echo "- when: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- machine: $(nproc) cores (${cpu_model:-unknown CPU}), $(uname -sr); loopback only; load average $LOADAVG_START (1/5/15 min) before the run"
  echo "- tools: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $({ wrk -v 2>&1 || true; } | awk 'NR == 1 { print $1, $2 }')${OHA:+, $("$OHA" --version 2>/dev/null | head -n1)}"
  if ((WD)); then
    echo "- proxy: $("$WHYDENIED_BIN" --version 2>/dev/null | head -n1) ($WHYDENIED_BIN, built $(date -u -r "$WHYDENIED_BIN" '+%Y-%m-%d %H:%M UTC')), config bench/whydenied-bench.yaml"
  fi
  if ((BARE)); then
    echo "- hyper alone: $BARE_BIN (examples/bare_proxy.rs, built $(date -u -r "$BARE_BIN" '+%Y-%m-%d %H:%M UTC'))"
  fi
  echo "- upstream: nginx, $UPSTREAM_WORKERS worker(s), \`/ok\` → 200 \"hello from upstream\", \`/denied\` → 403 \"Forbidden\"; reference proxy: nginx, 1 worker, upstream keepalive 64, sending the forwarding headers whydenied sends (bench/nginx-proxy.conf.tmpl)"
  [[ -n $PIN_NOTE ]] && echo "- CPU pinning: $PIN_NOTE"
  [[ -n $WD_NOTE ]] && echo "- **$WD_NOTE**"
  [[ -n $BARE_NOTE ]] && echo "- **$BARE_NOTE**"
  echo
  echo "## Saturation: \`wrk -t$THREADS -c$CONNS -d$DURATION\`$( ((REPEAT > 1)) && echo ", median of $REPEAT runs (req/s range in brackets)")"
  echo
  echo "| case | req/s | p50 | p99 | errors | peak RSS ($RSS_CONNS conns) | proxy CPU (cores) | upstream conns opened | req/s vs nginx | p99 vs nginx |"
  echo "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"
  for k in "${CASES[@]}"; do
    b=$(baseline_of "$k")
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
      "${RES[$k.label]}" "${RES[$k.sat.rps]}${RES[$k.sat.range]}" "$(fmt_us "${RES[$k.sat.p50]}")" "$(fmt_us "${RES[$k.sat.p99]}")" \
      "${RES[$k.sat.err]}" "$(mib "${RES[$k.rss]}")" "${RES[$k.sat.cpu]}" "${RES[$k.sat.upc]}" \
      "$([[ -n $b ]] && ratio "${RES[$k.sat.rps]}" "${RES[$b.sat.rps]}" || echo —)" \
      "$([[ -n $b ]] && ratio "${RES[$k.sat.p99]}" "${RES[$b.sat.p99]}" || echo —)"
  done
  echo
  if [[ -n $OHA ]]; then
    light_title="Light load: fixed rate $RATE req/s, \`oha -q $RATE -c $LIGHT_CONNS -z $LIGHT_DURATION --latency-correction\`"
  else
    light_title="Light load: 1 connection, closed loop, \`wrk -t1 -c1 -d$LIGHT_DURATION\` (not a fixed rate: oha was not available)"
  fi
  echo "## $light_title"
  echo
  echo "| case | req/s | p50 | p99 | errors | p50 vs nginx | p99 vs nginx |"
  echo "|---|---:|---:|---:|---|---:|---:|"
  for k in "${CASES[@]}"; do
    b=$(baseline_of "$k")
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' \
      "${RES[$k.label]}" "${RES[$k.light.rps]}" "$(fmt_us "${RES[$k.light.p50]}")" "$(fmt_us "${RES[$k.light.p99]}")" \
      "${RES[$k.light.err]}" \
      "$([[ -n $b ]] && ratio "${RES[$k.light.p50]}" "${RES[$b.light.p50]}" || echo —)" \
      "$([[ -n $b ]] && ratio "${RES[$k.light.p99]}" "${RES[$b.light.p99]}" || echo —)"
  done
  echo
  echo "## Many connections: \`wrk -t$THREADS -c$RSS_CONNS -d$RSS_DURATION\`"
  echo
  echo "| case | req/s | p50 | p99 | errors | upstream conns opened | RSS, $RSS_CONNS conns open (fresh) | RSS before | peak RSS (VmHWM) |"
  echo "|---|---:|---:|---:|---|---:|---:|---:|---:|"
  for k in "${CASES[@]}"; do
    [[ -n ${RES[$k.c256.rps]:-} ]] || continue
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
      "${RES[$k.label]}" "${RES[$k.c256.rps]}" "$(fmt_us "${RES[$k.c256.p50]}")" "$(fmt_us "${RES[$k.c256.p99]}")" \
      "${RES[$k.c256.err]}" "${RES[$k.c256.upc]}" "$( [[ -n ${RES[$k.open]:-} ]] && mib "${RES[$k.open]}" || echo —)" \
      "$(mib "${RES[$k.idle]}")" "$(mib "${RES[$k.rss]}")"
  done
  echo
  echo "Notes:"
  echo
  echo "- All on one $(nproc)-core machine: wrk ($THREADS threads), the proxy and the upstream share the CPU, so saturation numbers are CPU-bound and relative; compare rows, not absolute values with other machines. \"proxy CPU\" is CPU time used by the proxy process(es) per second of the saturation run (for \"direct\": the upstream's worker)."
  if [[ -n ${WHYDENIED_WORKERS:-} ]]; then
    echo "- nginx runs one worker; whydenied and hyper alone run with WHYDENIED_WORKERS=$WHYDENIED_WORKERS ($( [[ $WHYDENIED_WORKERS == 1 ]] && echo "one thread, like nginx's one worker" || echo "that many runtime threads"))."
  else
    echo "- nginx runs one worker; whydenied and hyper alone run a multi-threaded tokio runtime (one thread per core), so they may use more than one core$([[ -n $PIN_NOTE ]] && echo " (here: the cores left to the servers)"); \`WHYDENIED_WORKERS=1\` gives them one thread like nginx's one worker."
  fi
  if ((BARE)); then
    echo "- \"hyper alone\" is examples/bare_proxy.rs: hyper's HTTP/1 server and, per client connection, one hyper HTTP/1 client connection to the upstream, and nothing else (no header hygiene, no forwarding headers, no timeouts, no explanation layer); the upstream connection runs in a task of its own, where whydenied drives it from the client connection's task. Its gap to nginx is about what the HTTP library and the runtime cost; whydenied's gap to it is about whydenied's own work. It sends the upstream the client's headers only, where nginx and whydenied add the four forwarding headers."
  fi
  echo "- \"upstream conns opened\": connections the upstream accepted during the run (its stub_status). For \"direct\" these are wrk's own (plus its one probe connection). nginx's \`keepalive 64\` keeps at most 64 idle upstream connections per worker, so with more requests in flight than that it keeps opening (and closing) upstream connections."
  echo "- Errors: socket errors plus, for \`/ok\`, responses that are not 2xx/3xx and, for \`/denied\`, responses that are not 403. The whydenied denial row is compared with nginx passing the same 403 through."
  echo "- Peak RSS: VmHWM of the nginx proxy worker / the bare_proxy process / the whydenied process$( ((CLEAR_REFS_OK)) && echo ", reset before each $RSS_CONNS-connection run (/proc/PID/clear_refs), so it is that case's own peak" || echo "; it could not be reset between cases, so later rows include earlier peaks")."
  if [[ -n $OHA ]]; then
    echo "- Light load is open-loop at a fixed rate with latency correction (coordinated omission accounted for); req/s is the achieved rate."
  else
    echo "- Light load is one connection sending the next request as soon as the previous answer arrives (wrk cannot hold a fixed rate, and wrk2 is not packaged in Debian); install oha (\`cargo install oha --locked\`) for a fixed-rate run."
  fi
  local n f
  for f in upstream proxy; do
    n=$(grep -c . "$TMP/$f-error.log" 2>/dev/null || true)
    if [[ ${n:-0} != 0 ]]; then echo "- the nginx $f wrote ${n} line(s) to its error log (warn and above)."; fi
  done
  if ((BARE)); then
    n=$(grep -c . "$TMP/bare_proxy.log" 2>/dev/null || true)
    if [[ ${n:-0} != 0 ]]; then echo "- bare_proxy printed ${n} line(s) to stderr (one per dropped connection), the first: \`$(head -n1 "$TMP/bare_proxy.log")\`."; fi
  fi
  if ((WD)); then
    n=$(grep -cE '"level": ?"(WARN|ERROR)"' "$TMP/whydenied.log" 2>/dev/null || true)
    if [[ ${n:-0} != 0 ]]; then echo "- whydenied logged ${n} warning/error line(s)."; fi
    echo "- whydenied logged with RUST_LOG=${WHYDENIED_RUST_LOG:-<its default>}, to a file; it wrote $(mib $((WD_LOG_BYTES / 1024))) of log during its runs."
  fi
}

if [[ -n $RESULTS ]]; then
  report | tee "$RESULTS"
  log "written: $RESULTS"
else
  report
fi
