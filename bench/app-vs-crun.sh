#!/usr/bin/env bash
# Application containers against crun, in the same run, on the same busybox rootfs:
#   1. start-to-exit latency of `ltv run --rm busybox -- /bin/true` vs `crun run` (hyperfine);
#   2. idle memory per container (kernel + anon from /proc/meminfo, N sleeping containers).
# Usage (root): bench/app-vs-crun.sh [--runs N] [--rounds N] [--idle N] [--out DIR]
# Each command runs back to back in blocks of RUNS/ROUNDS, the blocks rotating through
# the commands ROUNDS times: a host that changes speed during the run (this one has fast
# and slow phases) then weighs on every command alike, as one block each would not.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=200
ROUNDS=5
IDLE=30
OUT=bench/out
while (($#)); do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--rounds N] [--idle N] [--out DIR]" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "run as root" >&2; exit 1; }
for p in crun hyperfine busybox-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >/dev/null; }
done
cargo build --release -q -p ltv
LTV=$PWD/target/x86_64-unknown-linux-gnu/release/ltv
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

WORK=$(mktemp -d /tmp/ltv-bench-XXXXXX)
chmod 711 "$WORK"   # unprivileged containers' root walks down to its rootfs
NETNS=ltv-bench-$$
DAEMON_PID=
cleanup() {
    set +e
    if [[ -n $DAEMON_PID ]]; then
        for n in $(LTV_SOCKET=$WORK/ltv.sock "$LTV" list --format json 2>/dev/null | grep -o '"name": "[^"]*"' | cut -d'"' -f4); do
            LTV_SOCKET=$WORK/ltv.sock "$LTV" delete --force "$n" >/dev/null 2>&1
        done
        kill "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null
    fi
    for i in $(seq "$IDLE"); do crun --root "$WORK/crun" delete -f "idle$i" >/dev/null 2>&1; done
    ip netns delete "$NETNS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# The daemon under test runs in a network namespace of our own.
ip netns add "$NETNS"
export LTV_SOCKET=$WORK/ltv.sock
nsenter --net=/run/netns/$NETNS "$LTV" daemon --state-dir "$WORK/state" --cgroup-root ltv-bench-$$ >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do "$LTV" list >/dev/null 2>&1 && break; sleep 0.05; done
"$LTV" image build busybox >/dev/null
FP=$("$LTV" image list | awk '$1=="busybox"{print $2}')
ROOTFS=$(ls -d "$WORK"/state/images/"$FP"*/rootfs)

# crun's bundle: the same rootfs, read-only, /bin/true, no terminal.
BUNDLE=$WORK/bundle
mkdir -p "$BUNDLE"
(cd "$BUNDLE" && crun spec)
python3 - "$BUNDLE/config.json" "$ROOTFS" <<'EOF'
import json, sys
path, rootfs = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["root"] = {"path": rootfs, "readonly": True}
c["process"]["args"] = ["/bin/true"]
c["process"]["terminal"] = False
json.dump(c, open(path, "w"), indent=1)
EOF

# crun refuses the hybrid cgroup layout unless the cgroup2 mount is hidden, so both
# tools are timed inside private mount namespaces without it (ltv is only the client there).
PER_BLOCK=$(( (RUNS + ROUNDS - 1) / ROUNDS ))
rm -f "$OUT"/app-start-*.json   # an earlier run's extra rounds would be counted in
echo "== start latency: $ROUNDS rounds of $PER_BLOCK back-to-back runs per command"
COMMANDS=(
    "ltv=$LTV run --rm busybox -- /bin/true"
    "ltv-none=$LTV run --rm --network none busybox -- /bin/true"
    "ltv-privileged-none=$LTV run --rm --privileged --network none busybox -- /bin/true"
    "ltv-ro-none=$LTV run --rm --read-only --network none busybox -- /bin/true"
    "crun=crun --root $WORK/crun run --bundle $BUNDLE bench-true"
)
for round in $(seq "$ROUNDS"); do
    args=()
    n=${#COMMANDS[@]}
    for i in $(seq 0 $((n - 1))); do
        # Rotated by one each round, and reversed every other one, so that no command
        # always follows the same other one (and its background work).
        (( round % 2 )) && j=$(( (i + round) % n )) || j=$(( (n - 1 - i + round) % n ))
        c=${COMMANDS[$j]}
        args+=(-n "${c%%=*}" "${c#*=}")
    done
    unshare -m --propagation private sh -c '
        umount /sys/fs/cgroup/unified 2>/dev/null || true
        runs=$0 out=$1; shift
        exec hyperfine -N --style none --warmup 5 --runs "$runs" --export-json "$out" "$@" >/dev/null
    ' "$PER_BLOCK" "$OUT/app-start-$round.json" "${args[@]}"
done
python3 - "$OUT"/app-start-*.json <<'EOF'
import json, statistics, sys
times = {}
for f in sys.argv[1:]:
    for x in json.load(open(f))["results"]:
        times.setdefault(x["command"], []).extend(x["times"])
json.dump({"times_s": times}, open(f.rsplit("/", 1)[0] + "/app-start.json", "w"))
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print(f"median: crun {med['crun']:.2f} ms")
for name, what in [
    ("ltv", "default: unprivileged (user namespace), veth on the bridge"),
    ("ltv-none", "unprivileged, --network none (loopback, as crun's bundle)"),
    ("ltv-privileged-none", "--privileged --network none (crun's default bundle)"),
    ("ltv-ro-none", "unprivileged, --read-only --network none (crun's bundle: read-only root, loopback)"),
]:
    print(f"median: {name} [{what}] {med[name]:.2f} ms, ratio to crun = {med[name] / med['crun']:.2f}x")
EOF

meminfo_kb() { # kernel + anon memory in use, in KiB
    awk '/^(AnonPages|Slab|KernelStack|PageTables|Shmem):/ {s+=$2} END {print s}' /proc/meminfo
}
settle() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; }

echo "== idle memory: $IDLE sleeping containers each"
ltv_idle_kib() { # ltv launch options...
    settle; local before after
    before=$(meminfo_kb)
    for i in $(seq "$IDLE"); do "$LTV" launch busybox "idle$i" --kind app "$@" -- sleep 3600 >/dev/null; done
    settle; after=$(meminfo_kb)
    for i in $(seq "$IDLE"); do "$LTV" delete --force "idle$i" >/dev/null; done
    echo $(( (after - before) / IDLE ))
}
ltv_kb=$(ltv_idle_kib)
ltv_ro_kb=$(ltv_idle_kib --read-only)

python3 - "$BUNDLE/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1])); c["process"]["args"] = ["/bin/sleep", "3600"]
json.dump(c, open(sys.argv[1], "w"), indent=1)
EOF
settle; before=$(meminfo_kb)
unshare -m --propagation private sh -c "
    umount /sys/fs/cgroup/unified 2>/dev/null || true
    for i in \$(seq $IDLE); do crun --root $WORK/crun run --detach --bundle $BUNDLE idle\$i </dev/null >/dev/null 2>&1; done
"
settle; after=$(meminfo_kb)
crun_kb=$(( (after - before) / IDLE ))
echo "idle memory per container (kernel+anon): ltv ${ltv_kb} KiB (--read-only ${ltv_ro_kb} KiB), crun ${crun_kb} KiB"
printf '{"ltv_idle_kib": %s, "ltv_read_only_idle_kib": %s, "crun_idle_kib": %s, "count": %s}\n' "$ltv_kb" "$ltv_ro_kb" "$crun_kb" "$IDLE" >"$OUT/app-idle-memory.json"
