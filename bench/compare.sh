#!/usr/bin/env bash
# Viaduct vs Kamailio, side by side, in one invocation (issue 9).
#
#   bash bench/compare.sh            # quick ladder + quick memory run
#   bash bench/compare.sh --full     # longer steps, higher rates, 10k/50k/100k calls held
#
# Options:
#   --rates "500 1000 2000"   call-rate ladder (stops climbing once any contender fails calls)
#   --seconds N               seconds of calls per step
#   --transports "tcp udp"    which transports
#   --contenders "kam-sl kam-dlg vd-plain vd-agent floor direct"
#   --mem-calls "1000 5000 10000"   established calls held in the memory run
#   --mem-contenders "vd-plain kam-dlg vd-agent"   who holds them
#   --no-memory | --memory-only | --no-install
# Tables again from the raw files of the last run (no new measurement):
#   bench/.venv/bin/python bench/lib/bench.py report bench/results/raw bench/results
#   bench/.venv/bin/python bench/lib/bench.py memreport bench/results/raw bench/results
#
# It installs what it needs (Debian kamailio and sip-tester, a Python venv
# with matplotlib under bench/.venv), builds viaduct and the demo backend in
# release mode, then for each transport and rate runs the same SIPp load
# through each contender in turn (the order rotates at each rate):
#   kam-sl    Kamailio dispatcher, stateless (bench/kamailio/dispatcher.cfg)
#   kam-dlg   the same with tm + dialog (-A STATEFUL)
#   vd-plain  viaduct, plain-SIP pool of the same SIPp UAS backends
#   vd-agent  viaduct, agent mode, demo backends (different backends: beside)
#   floor     viaduct-floor, a relay to one UAS that reads no SIP: what moving
#             the bytes costs on this machine (CPU and time per message)
#   direct    SIPp straight to one UAS: the latency baseline
# Every actor has its own 127.0.0.x address, every process it starts is
# stopped by its PID, every step is bounded in time. Results go to
# bench/results/ (summary.md, results.csv, plot.png, memory.md, memory.csv;
# raw/ holds the per-run files and is git-ignored).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RESULTS="$HERE/results"
RAW="$RESULTS/raw"

RATES="500 1000 2000 4000"
SECS=8
LAT_SECS=3          # the latency pass (packet capture) after each step
HOLD_MS=500
TRANSPORTS="tcp udp"
CONTENDERS="kam-sl kam-dlg vd-plain vd-agent floor direct"
MEM_CALLS="1000 5000 10000"
MEM_CONTENDERS="vd-plain kam-dlg vd-agent"
NBACK=2
MEMORY=1
LADDER=1
INSTALL=1
MODE=quick
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --full) MODE=full; RATES="500 1000 2000 4000 6000 8000"; SECS=20; LAT_SECS=5; MEM_CALLS="10000 50000 100000" ;;
    --quick) MODE=quick ;;
    --rates) RATES="$2"; shift ;;
    --seconds) SECS="$2"; shift ;;
    --transports) TRANSPORTS="$2"; shift ;;
    --contenders) CONTENDERS="$2"; shift ;;
    --mem-calls) MEM_CALLS="$2"; shift ;;
    --mem-contenders) MEM_CONTENDERS="$2"; shift ;;
    --no-memory) MEMORY=0 ;;
    --memory-only) LADDER=0 ;;
    --no-install) INSTALL=0 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }

# ------------------------------------------------------------------ install
if [ "$INSTALL" = 1 ]; then
  need=()
  command -v kamailio >/dev/null || need+=(kamailio)
  command -v sipp >/dev/null || need+=(sip-tester)
  command -v tcpdump >/dev/null || need+=(tcpdump)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (apt-get)"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${need[@]}"
  fi
  if [ ! -x "$HERE/.venv/bin/python" ] || ! "$HERE/.venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    log "making bench/.venv with matplotlib (pip)"
    python3 -m venv "$HERE/.venv"
    "$HERE/.venv/bin/pip" install --progress-bar on matplotlib
  fi
  log "cargo build --release -p balancer -p viaduct-demo-backend -p viaduct-bench-floor"
  (cd "$ROOT" && cargo build --release -p balancer -p viaduct-demo-backend -p viaduct-bench-floor)
fi
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY=python3
H() { "$PY" "$HERE/lib/bench.py" "$@"; }
TARGET_DIR="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
  "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
# Copies of the binaries under test: the shared target/ may be rebuilt while we run.
mkdir -p "$RAW/bin"
for b in viaduct viaduct-demo-backend viaduct-floor; do
  [ -x "$TARGET_DIR/release/$b" ] && cp "$TARGET_DIR/release/$b" "$RAW/bin/$b"
done
VIADUCT="$RAW/bin/viaduct"
DEMO="$RAW/bin/viaduct-demo-backend"
FLOOR="$RAW/bin/viaduct-floor"
# Each binary is needed only if a contender that runs it is listed.
WANTED="$([ "$LADDER" = 1 ] && echo "$CONTENDERS") $([ "$MEMORY" = 1 ] && echo "$MEM_CONTENDERS")"
need_bin() {  # BINARY PATTERN...
  local b=$1 c p; shift
  for c in $WANTED; do for p in "$@"; do
    if [ "$c" = "$p" ] && [ ! -x "$b" ]; then echo "missing $b (run without --no-install)" >&2; exit 1; fi
  done; done
}
need_bin "$VIADUCT" vd-plain vd-agent
need_bin "$DEMO" vd-agent
need_bin "$FLOOR" floor

# ------------------------------------------------------------------ actors
CLIENT_IP=127.0.0.60
UAS_IPS=(127.0.0.61 127.0.0.62 127.0.0.63 127.0.0.64)
UAS_IPS=("${UAS_IPS[@]:0:$NBACK}")
KAM_IP=127.0.0.70
VD_IP=127.0.0.71
FLOOR_IP=127.0.0.72
RUN=0
STARTED=()          # every PID this script started and has not stopped yet

started() { STARTED+=("$1"); }

# stop PID: SIGTERM, wait up to 5 s, then SIGKILL; only that PID (and, for
# Kamailio, the children it forked, listed by PID beforehand).
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local keep=()
  for p in "${STARTED[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  STARTED=("${keep[@]+"${keep[@]}"}")
}

# Kamailio forks: stop the main process, then any child still there, by PID.
stop_tree() {
  local root=$1 kids p
  kids=$("$PY" -c "import sys; sys.path.insert(0,'$HERE/lib'); import bench; print(' '.join(map(str, bench.tree($root)[1:])))")
  stop_pid "$root"
  for p in $kids; do
    kill -0 "$p" 2>/dev/null && { sleep 0.5; kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; } || true
  done
}

cleanup() {
  local p
  for p in "${STARTED[@]+"${STARTED[@]}"}"; do stop_tree "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_tcp() {  # ip port seconds
  local i
  for i in $(seq $(( $3 * 10 ))); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on $1:$2" >&2; return 1
}

# start_uas DIR TRANSPORT PORT: one SIPp UAS per backend address.
UAS_PIDS=()
start_uas() {
  local dir=$1 t=$2 port=$3 ip
  UAS_PIDS=()
  for ip in "${UAS_IPS[@]}"; do
    (cd "$dir" && exec sipp -sf "$HERE/sipp/uas.xml" -i "$ip" -p "$port" -t "$([ "$t" = tcp ] && echo t1 || echo u1)" \
      -aa -nostdin -max_socket 65000 -buff_size 4194304 -timeout "$(( SECS * 4 + 600 ))s" \
      >"$dir/uas-$ip.out" 2>&1) &
    UAS_PIDS+=($!); started $!
  done
  for ip in "${UAS_IPS[@]}"; do
    if [ "$t" = tcp ]; then wait_tcp "$ip" "$port" 10; fi
  done
  sleep 0.3
}
stop_uas() { local p; for p in "${UAS_PIDS[@]}"; do stop_pid "$p"; done; UAS_PIDS=(); }

# start_balancer CONTENDER DIR TRANSPORT PORT -> BAL_PID, TARGET
BAL_PID=""; DEMO_PIDS=(); TARGET=""
start_balancer() {
  local c=$1 dir=$2 t=$3 port=$4 ip
  BAL_PID=""; DEMO_PIDS=()
  case "$c" in
    kam-sl|kam-dlg)
      : >"$dir/dispatcher.list"
      for ip in "${UAS_IPS[@]}"; do echo "1 sip:$ip:$port;transport=$t 0 0" >>"$dir/dispatcher.list"; done
      sed -e "s|@IP@|$KAM_IP|g" -e "s|@PORT@|$port|g" -e "s|@LIST@|$dir/dispatcher.list|g" \
          -e "s|@CHILDREN@|4|g" "$HERE/kamailio/dispatcher.cfg" >"$dir/kamailio.cfg"
      local def=(); [ "$c" = kam-dlg ] && def=(-A STATEFUL)
      kamailio -DD -E -x tlsf -X tlsf -m 1024 -M 32 -f "$dir/kamailio.cfg" "${def[@]}" \
        -w "$dir" -P "$dir/kamailio.pid" >"$dir/kamailio.log" 2>&1 &
      BAL_PID=$!; started $BAL_PID
      wait_tcp "$KAM_IP" "$port" 20
      TARGET="$KAM_IP:$port" ;;
    vd-plain|vd-agent)
      printf 'bench secret %s\n' "$RANDOM$RANDOM" >"$dir/secret"
      {
        printf '[[sip.listen]]\ntransport = "udp"\naddress = "%s:%s"\n' "$VD_IP" "$port"
        printf '[[sip.listen]]\ntransport = "tcp"\naddress = "%s:%s"\n' "$VD_IP" "$port"
        printf '[agents]\nlisten = "%s:%s"\nsecret_file = "%s"\n' "$VD_IP" "$((port + 1))" "$dir/secret"
        printf '[admin]\nlisten = "%s:%s"\n' "$VD_IP" "$((port + 2))"
        printf '[log]\nfilter = "warn"\n'
        if [ "$c" = vd-plain ]; then
          printf '[routing]\ndefault_pool = "plain"\n[[pools]]\nname = "plain"\nmode = "sip"\nprobe_interval_ms = 1000\nmembers = ['
          local i=0 sep=""
          for ip in "${UAS_IPS[@]}"; do
            printf '%s{ address = "%s:%s", transport = "%s", name = "uas%s" }' "$sep" "$ip" "$port" "$t" "$i"
            sep=", "; i=$((i + 1))
          done
          printf ']\n'
        fi
      } >"$dir/viaduct.toml"
      VIADUCT_LOG=warn "$VIADUCT" run --config "$dir/viaduct.toml" >"$dir/viaduct.log" 2>&1 &
      BAL_PID=$!; started $BAL_PID
      wait_tcp "$VD_IP" "$((port + 2))" 20
      if [ "$c" = vd-agent ]; then
        local i
        for i in $(seq "$NBACK"); do
          RUST_LOG=warn VIADUCT_LOG=warn "$DEMO" --name "b$i" --balancer "$VD_IP:$((port + 1))" \
            --secret-file "$dir/secret" --stats-ms 0 >"$dir/demo-b$i.log" 2>&1 &
          DEMO_PIDS+=($!); started $!
        done
      fi
      H wait-up "$VD_IP:$((port + 2))" "$NBACK" 30
      TARGET="$VD_IP:$port" ;;
    floor)
      VIADUCT_LOG=warn "$FLOOR" --listen "$FLOOR_IP:$port" --to "${UAS_IPS[0]}:$port" --transport "$t" \
        >"$dir/floor.log" 2>&1 &
      BAL_PID=$!; started $BAL_PID
      if [ "$t" = tcp ]; then wait_tcp "$FLOOR_IP" "$port" 20; else sleep 0.5; fi
      TARGET="$FLOOR_IP:$port" ;;
    direct)
      TARGET="${UAS_IPS[0]}:$port" ;;
  esac
}

stop_balancer() {
  local p
  for p in "${DEMO_PIDS[@]+"${DEMO_PIDS[@]}"}"; do stop_pid "$p"; done
  DEMO_PIDS=()
  [ -n "$BAL_PID" ] && stop_tree "$BAL_PID"
  BAL_PID=""
}

# run_uac DIR SCENARIO TRANSPORT RATE CALLS LIMIT HOLD_MS BOUND_S [STOP_S] -> UAC_EXIT
# STOP_S: stop the client (by its PID) that many seconds after its start.
run_uac() {
  local dir=$1 sf=$2 t=$3 rate=$4 calls=$5 limit=$6 hold=$7 bound=$8 stop_s=${9:-}
  cp "$sf" "$dir/uac.xml"
  set +e
  (cd "$dir" && exec timeout -k 5 "$bound" sipp "$TARGET" -sf uac.xml -i "$CLIENT_IP" -p 0 \
     -t "$([ "$t" = tcp ] && echo t1 || echo u1)" -m "$calls" -r "$rate" -l "$limit" -d "$hold" \
     -recv_timeout 5000 -max_socket 65000 -buff_size 4194304 -nostdin -timeout "$(( bound - 5 ))s" \
     -default_behaviors all,-abortunexp \
     -trace_stat -stf stat.csv -fd 1 -trace_rtt -rtt_freq 1000 -trace_err \
     >"$dir/uac.out" 2>&1) &
  local pid=$!; started $pid
  if [ -n "$stop_s" ]; then
    local end=$(( $(date +%s) + stop_s ))
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 1; done
    kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
  fi
  wait "$pid"; UAC_EXIT=$?
  set -e
  local keep=(); for p in "${STARTED[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  STARTED=("${keep[@]+"${keep[@]}"}")
}

# latency_pass DIR TRANSPORT RATE CONTENDER PORT: a capture on lo of every
# packet to or from the run's ports, during LAT_SECS of calls at RATE.
latency_pass() {
  local dir=$1 t=$2 rate=$3 c=$4 port=$5 ldir="$1/latency" i
  mkdir -p "$ldir"
  tcpdump -i lo -n -s 0 -B 131072 -w "$ldir/cap.pcap" "portrange $port-$((port + 1))" >"$ldir/tcpdump.log" 2>&1 &
  local cap=$!; started $cap
  for i in $(seq 50); do grep -q "listening on" "$ldir/tcpdump.log" && break; sleep 0.1; done
  run_uac "$ldir" "$HERE/sipp/uac.xml" "$t" "$rate" "$(( rate * LAT_SECS ))" \
    "$(( rate * (HOLD_MS + 3000) / 1000 + 100 ))" "$HOLD_MS" "$(( LAT_SECS * 3 + 20 ))"
  sleep 0.3
  stop_pid "$cap"
  local extra=()
  [ "$c" = vd-agent ] && extra=(--agent-port "$((port + 1))")
  [ "$c" = direct ] && extra=(--direct)
  H latency "$ldir/cap.pcap" "$ldir/latency.json" --client "$CLIENT_IP" --backends "${UAS_IPS[@]}" \
    --port "$port" "${extra[@]}" >/dev/null || true
  grep -o 'Successful call.*\|Failed call.*' "$ldir/uac.out" | tail -2 | tr -s ' ' | sed 's/^/      latency pass: /'
  rm -f "$ldir/cap.pcap"
}

# ------------------------------------------------------------------ ladder
mkdir -p "$RAW"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [ "$LADDER" = 1 ]; then
  rm -f "$RAW/runs.jsonl"
  "$PY" - "$RAW/meta.json" "bash bench/compare.sh $ARGS" "$SECS" "$HOLD_MS" "$NBACK" "$VIADUCT" <<'EOF'
import json, os, subprocess, sys, datetime
out, cmd, secs, hold, nback, vd = sys.argv[1:]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
def v(c):
    try: return subprocess.run(c, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception: return "?"
rev = subprocess.run(["git", "-C", os.path.dirname(vd), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"command": cmd.strip(), "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
           "cpus": os.cpu_count(), "cpu_model": model, "loadavg": open("/proc/loadavg").read().split()[:3],
           "kamailio": v(["kamailio", "-v"]), "sipp": v(["sipp", "-v"]).strip() or "SIPp", "viaduct": rev,
           "seconds": secs, "hold_ms": hold, "backends": nback}, open(out, "w"), indent=1)
EOF
  read -r -a CONT <<<"$CONTENDERS"
  for t in $TRANSPORTS; do
    ri=0
    for rate in $RATES; do
      calls=$(( rate * SECS ))
      limit=$(( rate * (HOLD_MS + 3000) / 1000 + 100 ))
      bound=$(( SECS * 3 + 20 ))
      n=${#CONT[@]}
      any_failed=0
      log "== $t, $rate cps, $calls calls per contender =="
      for k in $(seq 0 $((n - 1))); do
        c=${CONT[$(( (k + ri) % n ))]}
        RUN=$((RUN + 1)); port=$((21000 + RUN * 4))
        dir="$RAW/$t-$rate-$c"; rm -rf "$dir"; mkdir -p "$dir"
        log "  $c"
        if [ "$c" != vd-agent ]; then start_uas "$dir" "$t" "$port"; fi
        start_balancer "$c" "$dir" "$t" "$port"
        mon=""
        if [ -n "$BAL_PID" ]; then
          "$PY" "$HERE/lib/bench.py" monitor "$BAL_PID" "$dir/monitor.json" & mon=$!; started $mon
          sleep 0.6
          cpu0=$(H cpu "$BAL_PID")
        else cpu0=-1; fi
        t0=$(date +%s.%N)
        run_uac "$dir" "$HERE/sipp/uac.xml" "$t" "$rate" "$calls" "$limit" "$HOLD_MS" "$bound"
        t1=$(date +%s.%N)
        if [ -n "$BAL_PID" ]; then cpu1=$(H cpu "$BAL_PID"); sleep 0.6; stop_pid "$mon"; else cpu1=-1; fi
        # Latency pass: the same load for LAT_SECS under a packet capture
        # (kept out of the CPU figures: the capture tap costs the senders CPU).
        latency_pass "$dir" "$t" "$rate" "$c" "$port"
        stop_balancer
        stop_uas
        verdict=$(H record --out "$RAW/runs.jsonl" --transport "$t" --contender "$c" --rate "$rate" \
          --latency "$dir/latency/latency.json" \
          --calls "$calls" --stat "$dir/stat.csv" --rtt "$dir"/uac_*_rtt.csv --monitor "$dir/monitor.json" \
          --cpu-before "$cpu0" --cpu-after "$cpu1" --sipp-exit "$UAC_EXIT" \
          --wall "$(awk "BEGIN{print $t1 - $t0}")")
        echo "$verdict" | grep -v '^\(CLEAN\|FAILED\)$' || true
        if echo "$verdict" | grep -q '^FAILED$'; then any_failed=1; fi
      done
      ri=$((ri + 1))
      if [ "$any_failed" = 1 ]; then log "  calls failed at $rate cps over $t: not climbing further"; break; fi
    done
  done
  H report "$RAW" "$RESULTS"
fi

# ------------------------------------------------------------------ memory
if [ "$MEMORY" = 1 ]; then
  rm -f "$RAW/memory.jsonl"
  t=tcp
  for N in $MEM_CALLS; do
    rate=$(( N / 5 )); [ "$rate" -gt 1000 ] && rate=1000; [ "$rate" -lt 100 ] && rate=100
    ramp=$(( (N + rate - 1) / rate ))
    plateau=8     # "held": [ramp+2, ramp+8] s, the new-call table still full of the ramp's calls
    late=40       # "late": [ramp+40, ramp+46] s, the table's entries expired (32 s), calls still held
    d_ms=$(( N > 2000 ? N : 2000 ))                 # ~1,000 in-dialog OPTIONS/s in all
    count=$(( (ramp + late + 10) * 1000 / d_ms + 2 ))
    bound=$(( ramp + count * d_ms / 1000 + 60 ))
    for c in $MEM_CONTENDERS; do
      RUN=$((RUN + 1)); port=$((21000 + RUN * 4))
      dir="$RAW/mem-$N-$c"; rm -rf "$dir"; mkdir -p "$dir"
      log "memory: $N established calls through $c ($rate cps ramp, OPTIONS every $d_ms ms x $count)"
      if [ "$c" != vd-agent ]; then start_uas "$dir" "$t" "$port"; fi
      start_balancer "$c" "$dir" "$t" "$port"
      sleep 1
      idle=$("$PY" -c "import sys; sys.path.insert(0,'$HERE/lib'); import bench; p,r,h=bench.mem($BAL_PID); print(p if '$c'.startswith('kam') else r)")
      "$PY" "$HERE/lib/bench.py" monitor "$BAL_PID" "$dir/monitor.json" --interval 1 & mon=$!; started $mon
      sed "s/@OPTIONS_COUNT@/$count/" "$HERE/sipp/uac_hold.xml" >"$dir/hold.xml"
      # The client is stopped by its PID once the late window is read: the
      # calls need not run to their BYE (at 100k that would double the run).
      run_uac "$dir" "$dir/hold.xml" "$t" "$rate" "$N" "$(( N + 100 ))" "$d_ms" "$bound" \
        "$(( ramp + late + 8 ))"
      stop_pid "$mon"
      stop_balancer
      stop_uas
      H memrecord --out "$RAW/memory.jsonl" --transport "$t" --contender "$c" --calls "$N" \
        --stat "$dir/stat.csv" --monitor "$dir/monitor.json" --idle-kb "$idle" \
        --ramp-s "$ramp" --plateau-s "$plateau" --late-s "$late"
    done
  done
  H memreport "$RAW" "$RESULTS" --command "bash bench/compare.sh $ARGS" --date "$(date -u '+%Y-%m-%d %H:%M UTC')"
fi
log "done: $RESULTS"
