#!/usr/bin/env bash
# The runonce load benchmark: every scenario against every system in one run, on this machine, loopback only.
#
#   bench/run.sh                 full run (about 6 minutes), table on stdout and in BENCHMARKS.md
#   bench/run.sh --smoke         a few seconds per row, no soak worth the name; for tests/bench_smoke.rs
#
# Options:
#   --smoke            1 s per row, no warm-up, 3 s soak; a missing idempotent-proxy is shown as skipped
#   --duration S       seconds measured per row (default 10)
#   --warmup S         seconds of load before each measured row (default 2)
#   --soak S           seconds of the memory-store soak (default 60)
#   --pairs N          pass-through rounds, runonce and nginx alternating (default 3; --smoke: 1)
#   --bin PATH         the runonce binary to measure (default: cargo build --release, target/release/runonce)
#   --out FILE         the Markdown file whose generated section is replaced (default BENCHMARKS.md;
#                      --smoke writes nowhere unless --out is given)
#
# Systems: the upstream (nginx answering a fixed PowerJob body: the mock records every request and would be the
# bottleneck), runonce, nginx proxy_pass with keep-alive, and idempotent-proxy (installed into bench/.tools on
# first use: it compiles for several minutes). Load: wrk with bench/load.lua. Every process is started here on
# free loopback ports, in a temporary directory, and stopped on exit; nothing system-wide is used or changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE=0
DURATION=10
WARMUP=2
SOAK=60
PAIRS=3
BIN=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; DURATION=1; WARMUP=0; SOAK=3; PAIRS=1 ;;
    --duration) DURATION="$2"; shift ;;
    --warmup) WARMUP="$2"; shift ;;
    --soak) SOAK="$2"; shift ;;
    --pairs) PAIRS="$2"; shift ;;
    --bin) BIN="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "bench: unknown option $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done
if [ -z "$OUT" ] && [ "$SMOKE" = 0 ]; then OUT="$ROOT/BENCHMARKS.md"; fi

# Concurrency of every row; the replay rows also run at the high one.
CONNS=32
CONNS_HIGH=256
THREADS=2
# The soak runs at the defaults: the memory store fills to memory_max_keys (6 000) within its first seconds,
# then makes room by evicting delivered answers. Growth is measured from this many seconds in.
SOAK_SETTLED=10s
SOAK_SAMPLE=5
[ "$SMOKE" = 1 ] && SOAK_SAMPLE=1

for tool in wrk nginx redis-server redis-cli ss; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "bench: $tool is missing; run scripts/setup.sh (make setup) first" >&2
    exit 1
  fi
done

if [ -z "$BIN" ]; then
  echo "bench: building runonce (release)" >&2
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  BIN="$ROOT/target/release/runonce"
fi

IDP="$ROOT/bench/.tools/bin/idempotent-proxy-server"
IDP_STATUS=ok
if [ ! -x "$IDP" ]; then
  if [ "$SMOKE" = 1 ]; then
    IDP_STATUS="skipped (not installed)"
  else
    echo "bench: installing idempotent-proxy-server into bench/.tools (compiles for several minutes, once)" >&2
    if ! cargo install --locked --quiet idempotent-proxy-server --root "$ROOT/bench/.tools" >&2; then
      IDP_STATUS="skipped (install failed)"
    fi
  fi
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/runonce-bench.XXXXXX")"
chmod 755 "$TMP" # nginx workers drop to an unprivileged user when started as root
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- processes ---------------------------------------------------------------------------------------------

# A loopback port nothing listens on, below the kernel's ephemeral range: a port in that range may be the local
# end of one of wrk's connections at any moment, and then a listener cannot bind it. (A race with other programs
# is still possible; the start then fails loudly.)
free_port() {
  local used port low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 11000 ] 2>/dev/null || low=32768
  used="$(ss -Htan | awk '{print $4}' | sed 's/.*://')"
  while :; do
    port=$((10000 + RANDOM % (low - 10000)))
    grep -qx "$port" <<<"$used" || { echo "$port"; return; }
  done
}

wait_port() {
  local port=$1 i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: nothing listens on $port after 10 s" >&2
  return 1
}

stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# start_nginx NAME PORT BODY: nginx in the foreground with its own prefix; BODY is the http{} server block.
start_nginx() {
  local name=$1 port=$2 workers=$3 server=$4 dir="$TMP/$1"
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  $server
}
EOF
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" &
  PIDS+=($!)
  LAST_PID=$!
  wait_port "$port"
}

# The upstream: a PowerJob 5.1.0-style answer (no auth header) to any request.
UP_PORT=$(free_port)
start_nginx upstream "$UP_PORT" 1 "
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UP_PORT;
    default_type application/json;
    location / { return 200 '{\"success\":true,\"code\":null,\"data\":754612332134400064,\"message\":null}'; }
    # 5.1.1's lookup, with nothing found: what a quarantined leader asks before sending (row 4b).
    location = /openApi/queryInstance {
      return 200 '{\"success\":true,\"data\":{\"index\":0,\"pageSize\":100,\"totalPages\":0,\"totalItems\":0,\"data\":[]},\"message\":null}';
    }
  }"
UP_PID=$LAST_PID
UP_URL="http://127.0.0.1:$UP_PORT"

NGINX_PORT=$(free_port)
start_nginx proxy "$NGINX_PORT" 2 "
  upstream powerjob { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://powerjob;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
NGINX_PID=$LAST_PID

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning \
  >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"

# start_runonce STORE [FLAGS...]: a fresh runonce (a fresh peak RSS) per row; sets RO_PID, RO_PORT and
# RO_ADMIN. A new process is in quarantine for a window (its memory store starts empty; the Redis rows flush
# Redis first): the rows measure outside it (--quarantine false), except row 4b, which sets QUARANTINE=true.
start_runonce() {
  local store=$1 i
  shift
  : >"$TMP/runonce.out"
  # The default log level (info: a line per guarded call), to a file, as a deployment would run it.
  "$BIN" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --upstream "$UP_URL" --store "$store" \
    --quarantine "${QUARANTINE:-false}" "$@" >"$TMP/runonce.out" 2>>"$TMP/runonce.log" &
  RO_PID=$!
  PIDS+=($RO_PID)
  for i in $(seq 100); do
    RO_PORT="$(sed -n 's/^listening proxy=127.0.0.1:\([0-9]*\) .*/\1/p' "$TMP/runonce.out")"
    RO_ADMIN="$(sed -n 's/^listening .*admin=127.0.0.1:\([0-9]*\).*/\1/p' "$TMP/runonce.out")"
    [ -n "$RO_PORT" ] && return 0
    sleep 0.1
  done
  echo "bench: runonce did not start; its log:" >&2
  tail -20 "$TMP/runonce.log" >&2
  exit 1
}

# start_idp: idempotent-proxy on the same upstream and Redis (it reads .env from its working directory and
# maps the path /URL_RUNJOB to the URL in URL_RUNJOB); default log level, to a file. Sets IDP_PID, IDP_PORT.
# REQUEST_TIMEOUT is also how long it keeps an answer: 60 s (runonce's default window) rather than its 10 s
# default, so that no key expires inside a row and the replay rows measure replays.
start_idp() {
  IDP_PORT=$(free_port)
  mkdir -p "$TMP/idp"
  cat >"$TMP/idp/.env" <<EOF
SERVER_ADDR=127.0.0.1:$IDP_PORT
REDIS_URL=$REDIS_URL
URL_RUNJOB=$UP_URL/openApi/runJob
REQUEST_TIMEOUT=60000
EOF
  (cd "$TMP/idp" && exec "$IDP") >>"$TMP/idp.log" 2>&1 &
  IDP_PID=$!
  PIDS+=($IDP_PID)
  wait_port "$IDP_PORT"
}

# value SCENARIO SYSTEM CONNS COLUMN: one cell of the results (empty when the row is missing or not a number).
value() {
  awk -F'\t' -v s="$1" -v sys="$2" -v c="$3" -v col="$4" \
    '$1 == s && $2 == sys && $3 == c && $col ~ /^[0-9.]+$/ { print $col }' "$RESULTS"
}

# div A B: A / B to two decimals (empty when either is missing).
div() { [ -z "$1" ] || [ -z "$2" ] && { echo ""; return; }; awk -v a="$1" -v b="$2" 'BEGIN { if (b != 0) printf "%.2f", a / b }'; }

# ---- measuring ---------------------------------------------------------------------------------------------

# CPU ticks (user + system) used so far by the given processes.
cpu_ticks() {
  local total=0 pid fields
  for pid in "$@"; do
    fields=($(sed 's/^.*) //' "/proc/$pid/stat"))
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}

peak_rss_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wrk_run SECONDS CONNS PORT PATH KEYS KEY_HEADER NONCE: prints wrk's RESULT line (empty when wrk failed).
# Runs with the same NONCE send the same fixed key, and the same sequence of unique ones.
wrk_run() {
  local seconds=$1 conns=$2 port=$3 path=$4 keys=$5 header=$6 nonce=$7 threads=$THREADS
  [ "$conns" -lt "$threads" ] && threads=$conns
  BENCH_PATH=$path BENCH_KEYS=$keys BENCH_KEY_HEADER=$header BENCH_NONCE=$nonce \
    wrk -t "$threads" -c "$conns" -d "${seconds}s" --timeout 10s -s "$ROOT/bench/load.lua" \
    "http://127.0.0.1:$port" 2>&1 | grep '^RESULT' || true
}

# field NAME RESULT: a number from a RESULT line (0 when absent).
field() {
  local v
  v=$(sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" $2")
  echo "${v:-0}"
}

# wrk_errors RESULT: socket errors (connect, read, write, timeout) and non-2xx answers.
wrk_errors() {
  echo $(($(field connect "$1") + $(field read "$1") + $(field write "$1") + $(field timeout "$1") \
    + $(field status "$1")))
}

RESULTS="$TMP/results.tsv"
: >"$RESULTS"

# measure SCENARIO SYSTEM CONNS PORT PATH KEYS KEY_HEADER RSS_PID CPU_PIDS...: one table row.
measure() {
  local scenario=$1 system=$2 conns=$3 port=$4 path=$5 keys=$6 header=$7 rss_pid=$8
  shift 8
  local before after result requests seconds errors rss="-" nonce="$RANDOM$RANDOM" warm
  if [ "$keys" = fixed ]; then
    # Store the answer first, one request at a time: the rows measure the replay of a stored answer, not
    # the stampede on a fresh key.
    wrk_run 1 1 "$port" "$path" "$keys" "$header" "$nonce" >/dev/null
  fi
  if [ "$WARMUP" -gt 0 ]; then
    [ "$keys" = fixed ] && warm=$nonce || warm="$nonce-warm-up"
    wrk_run "$WARMUP" "$conns" "$port" "$path" "$keys" "$header" "$warm" >/dev/null
  fi
  before=$(cpu_ticks "$@")
  result=$(wrk_run "$DURATION" "$conns" "$port" "$path" "$keys" "$header" "$nonce")
  after=$(cpu_ticks "$@")
  [ "$rss_pid" != "-" ] && rss=$(peak_rss_kib "$rss_pid")
  if [ -z "$result" ]; then
    printf '%s\t%s\t%s\tfailed (no wrk result)\t-\t-\t-\t-\t-\t-\n' "$scenario" "$system" "$conns" >>"$RESULTS"
    return
  fi
  requests=$(field requests "$result")
  seconds=$(field duration_us "$result")
  errors=$(wrk_errors "$result")
  awk -v s="$scenario" -v sys="$system" -v c="$conns" -v n="$requests" -v us="$seconds" \
    -v p50="$(field p50_us "$result")" -v p99="$(field p99_us "$result")" -v p999="$(field p999_us "$result")" \
    -v err="$errors" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v rss="$rss" 'BEGIN {
      cpu = n > 0 ? sprintf("%.1f", ticks / hz * 1e6 / n) : "-"
      mib = rss == "-" ? "-" : sprintf("%.1f", rss / 1024)
      printf "%s\t%s\t%s\t%.0f\t%.2f\t%.2f\t%.2f\t%d\t%s\t%s\n", s, sys, c, n / (us / 1e6),
        p50 / 1000, p99 / 1000, p999 / 1000, err, cpu, mib
    }' >>"$RESULTS"
  echo "bench: $scenario / $system / c=$conns done" >&2
}

skipped() {
  printf '%s\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\n' "$1" "$2" "$3" "$IDP_STATUS" >>"$RESULTS"
}

flush_redis() { redis-cli -p "$REDIS_PORT" flushall >/dev/null; }

STATUS=/openApi/fetchInstanceStatus
RUNJOB=/openApi/runJob
UP_WORKERS=$(pgrep -P "$UP_PID" | tr '\n' ' ')
NGINX_WORKERS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# 1. The ceiling.
measure "direct (ceiling)" "upstream nginx" $CONNS "$UP_PORT" $STATUS none "" - $UP_WORKERS

# 2-3. Pass-through: runonce and nginx, in PAIRS rounds, which of the two goes first alternating. The two are
# close, and a shared machine drifts within a run: one pair of rows has moved their ratio by 5% from one run to
# the next. The table keeps the round with the median ratio; the verdict lists every round's.
P="pass-through fetchInstanceStatus"
pass_runonce() {
  start_runonce memory
  measure "$P" runonce $CONNS "$RO_PORT" $STATUS none "" "$RO_PID" "$RO_PID"
  stop "$RO_PID"
}
pass_nginx() { measure "$P" "nginx proxy_pass" $CONNS "$NGINX_PORT" $STATUS none "" - $NGINX_WORKERS; }
ALL_RESULTS=$RESULTS
: >"$TMP/pass-ratios"
for round in $(seq "$PAIRS"); do
  RESULTS="$TMP/pass.$round"
  if [ $((round % 2)) = 1 ]; then pass_runonce; pass_nginx; else pass_nginx; pass_runonce; fi
  echo "$(div "$(value "$P" runonce $CONNS 4)" "$(value "$P" "nginx proxy_pass" $CONNS 4)") $round" \
    >>"$TMP/pass-ratios"
done
RESULTS=$ALL_RESULTS
PASS_RATIOS=$(awk '{ printf "%s%s", (NR > 1 ? ", " : ""), ($1 == "" ? "n/a" : $1) }' "$TMP/pass-ratios")
median_round=$(sort -n "$TMP/pass-ratios" | awk -v n="$PAIRS" 'NR == int((n + 1) / 2) { print $NF }')
awk -F'\t' '$2 == "runonce" { print } $2 != "runonce" { rest = rest $0 "\n" } END { printf "%s", rest }' \
  "$TMP/pass.${median_round:-1}" >>"$RESULTS"

# 4. Guarded runJob, a new key per request.
start_runonce memory
measure "runJob unique keys" "runonce memory" $CONNS "$RO_PORT" $RUNJOB unique "" "$RO_PID" "$RO_PID"
stop "$RO_PID"
flush_redis
start_runonce "$REDIS_URL"
measure "runJob unique keys" "runonce redis" $CONNS "$RO_PORT" $RUNJOB unique "" "$RO_PID" "$RO_PID"
stop "$RO_PID"

# 4b. The same in a quarantine (the store lost its records less than a window ago): every new leader asks
# PowerJob's queryInstance first (an empty page here), then sends. The row's cost per call, against row 4; the
# admin's count of checks shows that every call asked.
U="runJob unique keys"
UQ="runJob unique keys, in quarantine"
QUARANTINE=true start_runonce memory
measure "$UQ" "runonce memory" $CONNS "$RO_PORT" $RUNJOB unique "" "$RO_PID" "$RO_PID"
QUARANTINE_CHECKS=$(exec 3<>"/dev/tcp/127.0.0.1/$RO_ADMIN" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 &&
  sed -n 's/^runonce_quarantine_checks_total{result="none"} \([0-9]*\).*/\1/p' <&3)
stop "$RO_PID"

# 6. idempotent-proxy, unique keys (its key is the header; the body is the same shape as runonce's).
if [ "$IDP_STATUS" = ok ]; then
  flush_redis
  start_idp
  measure "runJob unique keys" "idempotent-proxy redis" $CONNS "$IDP_PORT" /URL_RUNJOB unique idempotency-key \
    "$IDP_PID" "$IDP_PID"
  stop "$IDP_PID"
else
  skipped "runJob unique keys" "idempotent-proxy redis" $CONNS
fi

# 5-6. One key for every request: the stored answer replayed.
for conns in $CONNS $CONNS_HIGH; do
  start_runonce memory
  measure "runJob one Idempotency-Key (replay)" "runonce memory" "$conns" "$RO_PORT" $RUNJOB fixed Idempotency-Key \
    "$RO_PID" "$RO_PID"
  stop "$RO_PID"
  flush_redis
  start_runonce "$REDIS_URL"
  measure "runJob one Idempotency-Key (replay)" "runonce redis" "$conns" "$RO_PORT" $RUNJOB fixed Idempotency-Key \
    "$RO_PID" "$RO_PID"
  stop "$RO_PID"
  if [ "$IDP_STATUS" = ok ]; then
    flush_redis
    start_idp
    measure "runJob one Idempotency-Key (replay)" "idempotent-proxy redis" "$conns" "$IDP_PORT" /URL_RUNJOB fixed \
      idempotency-key "$IDP_PID" "$IDP_PID"
    stop "$IDP_PID"
  else
    skipped "runJob one Idempotency-Key (replay)" "idempotent-proxy redis" "$conns"
  fi
done

# Soak: unique keys on the memory store, RSS sampled while it runs.
start_runonce memory
SOAK_BASE=$(rss_kib "$RO_PID")
SOAK_OUT="$TMP/soak.result"
( wrk_run "$SOAK" $CONNS "$RO_PORT" $RUNJOB unique "" "soak$RANDOM" >"$SOAK_OUT" ) &
SOAK_WRK=$!
SAMPLES=""
for ((t = SOAK_SAMPLE; t <= SOAK; t += SOAK_SAMPLE)); do
  sleep "$SOAK_SAMPLE"
  SAMPLES="$SAMPLES $(rss_kib "$RO_PID")"
done
wait "$SOAK_WRK" || true
SOAK_RESULT="$(cat "$SOAK_OUT")"
SOAK_PEAK=$(peak_rss_kib "$RO_PID")
stop "$RO_PID"
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# ---- report ------------------------------------------------------------------------------------------------

# ratio_row TARGET MEASURED GOAL MET
ratio_rows=""
ratio_row() { ratio_rows="$ratio_rows| $1 | $2 | $3 | $4 |"$'\n'; }

# check A OP B: "yes"/"no", or "n/a" when a figure is missing.
check() {
  [ -z "$1" ] || [ -z "$3" ] && { echo "n/a"; return; }
  awk -v a="$1" -v b="$3" -v op="$2" 'BEGIN { ok = op == ">=" ? a >= b : a <= b; print ok ? "yes" : "no" }'
}
minus() { [ -z "$1" ] || [ -z "$2" ] && { echo ""; return; }; awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a - b }'; }
shown() { [ -n "$1" ] && echo "$1" || echo "n/a"; }

U="runJob unique keys"
R="runJob one Idempotency-Key (replay)"
direct_p99=$(value "direct (ceiling)" "upstream nginx" $CONNS 6)
ro_pass=$(value "$P" runonce $CONNS 4)
ng_pass=$(value "$P" "nginx proxy_pass" $CONNS 4)
r=$(div "$ro_pass" "$ng_pass")
ratio_row "pass-through req/s, runonce ÷ nginx (median of $PAIRS rounds: $PASS_RATIOS)" "$(shown "$r")" "≥ 1.0" \
  "$(check "$r" ">=" 1.0)"
ro_add=$(minus "$(value "$P" runonce $CONNS 6)" "$direct_p99")
ng_add=$(minus "$(value "$P" "nginx proxy_pass" $CONNS 6)" "$direct_p99")
ratio_row "pass-through p99 added over direct (ms), runonce vs nginx" "$(shown "$ro_add") vs $(shown "$ng_add")" \
  "runonce ≤ nginx" "$(check "$ro_add" "<=" "$ng_add")"
r=$(div "$(value "$U" "runonce redis" $CONNS 4)" "$(value "$U" "idempotent-proxy redis" $CONNS 4)")
ratio_row "unique runJob on Redis req/s, runonce ÷ idempotent-proxy" "$(shown "$r")" "≥ 1.5" "$(check "$r" ">=" 1.5)"
a=$(value "$U" "runonce redis" $CONNS 6)
b=$(value "$U" "idempotent-proxy redis" $CONNS 6)
ratio_row "unique runJob on Redis p99 (ms), runonce vs idempotent-proxy" "$(shown "$a") vs $(shown "$b")" \
  "runonce ≤ idempotent-proxy" "$(check "$a" "<=" "$b")"
for conns in $CONNS $CONNS_HIGH; do
  r=$(div "$(value "$R" "runonce redis" "$conns" 4)" "$(value "$R" "idempotent-proxy redis" "$conns" 4)")
  ratio_row "replay on Redis req/s at c=$conns, runonce ÷ idempotent-proxy duplicate" "$(shown "$r")" "≥ 2" \
    "$(check "$r" ">=" 2)"
done
a=$(value "$U" "runonce memory" $CONNS 4)
b=$(value "$UQ" "runonce memory" $CONNS 4)
cpu_added=$(minus "$(value "$UQ" "runonce memory" $CONNS 9)" "$(value "$U" "runonce memory" $CONNS 9)")
ratio_row "unique runJob on memory in quarantine: req/s ÷ outside; CPU µs/req added; calls that asked first" \
  "$(shown "$(div "$b" "$a")"); +$(shown "$cpu_added"); $(shown "$QUARANTINE_CHECKS")" "(the cost, reported)" "-"
# Peak RSS over every runonce row, unique keys on the memory store included (it holds up to memory_max_keys
# answers, about 1.8 KiB each).
peak=$(awk -F'\t' '$2 ~ /^runonce/ && $10 ~ /^[0-9.]+$/ && $10 > m { m = $10 } END { if (m) print m }' "$RESULTS")
ratio_row "runonce peak RSS, every row (MiB)" "$(shown "$peak")" "≤ 30" "$(check "$peak" "<=" 30)"

# Soak verdict: the last sample against the first one after the window filled (the end of the window's
# length plus one sample), with 1 MiB of slack for allocator noise.
soak_requests=$(field requests "$SOAK_RESULT")
soak_errors=$(wrk_errors "$SOAK_RESULT")
# No wrk result at all counts as a failure of the soak, not as a clean one.
[ -z "$SOAK_RESULT" ] && soak_errors=1
soak_line=$(awk -v samples="$SAMPLES" -v every="$SOAK_SAMPLE" -v window="${SOAK_SETTLED%s}" -v base="$SOAK_BASE" \
  -v peak="$SOAK_PEAK" -v n="${soak_requests:-0}" -v err="$soak_errors" 'BEGIN {
    count = split(samples, s, " ")
    settled = int(window / every) + 2
    if (settled > count) settled = count
    list = ""
    for (i = 1; i <= count; i++) list = list sprintf("%s%.1f", i > 1 ? " " : "", s[i] / 1024)
    growth = (s[count] - s[settled]) / 1024
    verdict = (count >= 2 && growth <= 1 && err == 0) ? "yes" : "no"
    printf "%s\t%.1f\t%.1f\t%.1f\t%d\t%d\t%s", list, base / 1024, peak / 1024, growth, n, err, verdict
  }')
IFS=$'\t' read -r soak_samples soak_base soak_peak soak_growth soak_n soak_err soak_ok <<<"$soak_line"
ratio_row "soak: RSS growth after the window filled (MiB), refusals" "$soak_growth, $soak_err" "≤ 1, 0" "$soak_ok"

commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
git -C "$ROOT" diff --quiet 2>/dev/null || commit="$commit (with uncommitted changes)"
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
mode="full"
[ "$SMOKE" = 1 ] && mode="smoke (too short to mean anything)"

REPORT="$TMP/report.md"
{
  echo "Run: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit, mode $mode."
  echo "Machine: $cpu_model, $(nproc) cores; load average $LOAD_BEFORE before, $LOAD_AFTER after."
  echo "Each row: ${WARMUP}s warm-up, ${DURATION}s measured, wrk -t$THREADS; runonce restarted per row (peak RSS is"
  echo "that row's). CPU µs/req: CPU time of the system under test (all its processes) per answered request."
  echo
  echo "| scenario | system | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | CPU µs/req | peak RSS MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }' \
    "$RESULTS"
  echo
  echo "| target (ratios from this run) | measured | goal | met |"
  echo "|---|---|---|---|"
  printf '%s' "$ratio_rows"
  echo
  echo "Soak: ${SOAK}s of unique runJob keys at c=$CONNS on the memory store (every setting at its default;"
  echo "growth measured from ${SOAK_SETTLED} in): $soak_n requests, $soak_err refused or failed; RSS every ${SOAK_SAMPLE}s (MiB): $soak_samples;"
  echo "at start $soak_base, peak $soak_peak."
} >"$REPORT"

cat "$REPORT"
if [ -n "$OUT" ]; then
  begin='<!-- bench:begin (generated by bench/run.sh; do not edit by hand) -->'
  end='<!-- bench:end -->'
  [ -f "$OUT" ] || printf '# Benchmarks\n\n' >"$OUT"
  if ! grep -qF "$begin" "$OUT"; then printf '\n%s\n%s\n' "$begin" "$end" >>"$OUT"; fi
  awk -v begin="$begin" -v end="$end" -v report="$REPORT" '
    $0 == begin { print; while ((getline line < report) > 0) print line; skipping = 1; next }
    $0 == end { skipping = 0 }
    !skipping { print }' "$OUT" >"$TMP/out.md"
  cp "$TMP/out.md" "$OUT"
  echo "bench: figures written to $OUT" >&2
fi
