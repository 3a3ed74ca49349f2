#!/usr/bin/env bash
# Application containers against crun, in the same run, on the same busybox rootfs:
#   1. start-to-exit latency of `ltv run --rm busybox -- /bin/true` vs `crun run` (hyperfine);
#   2. idle memory per container (kernel + anon from /proc/meminfo, N sleeping containers).
# Usage (root): bench/app-vs-crun.sh [--runs N] [--idle N] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=200
IDLE=30
OUT=bench/out
while (($#)); do
    case "$1" in
        --runs) RUNS=$2; shift 2 ;;
        --idle) IDLE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--runs N] [--idle N] [--out DIR]" >&2; exit 2 ;;
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
# tools are timed inside one private mount namespace without it (ltv is only the client there).
echo "== start latency: $RUNS runs each, interleaved by hyperfine's warm-up"
unshare -m --propagation private sh -c "
    umount /sys/fs/cgroup/unified 2>/dev/null || true
    hyperfine -N --warmup 10 --runs $RUNS --export-json '$OUT/app-start.json' \
        -n ltv '$LTV run --rm busybox -- /bin/true' \
        -n ltv-none '$LTV run --rm --network none busybox -- /bin/true' \
        -n ltv-privileged-none '$LTV run --rm --privileged --network none busybox -- /bin/true' \
        -n crun 'crun --root $WORK/crun run --bundle $BUNDLE bench-true'
"
python3 - "$OUT/app-start.json" <<'EOF'
import json, statistics, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
med = {k: statistics.median(v["times"]) * 1e3 for k, v in r.items()}
print(f"median: crun {med['crun']:.2f} ms")
for name, what in [
    ("ltv", "default: unprivileged (user namespace), veth on the bridge"),
    ("ltv-none", "unprivileged, --network none (loopback, as crun's bundle)"),
    ("ltv-privileged-none", "--privileged --network none (crun's default bundle)"),
]:
    print(f"median: {name} [{what}] {med[name]:.2f} ms, ratio to crun = {med[name] / med['crun']:.2f}x")
EOF

meminfo_kb() { # kernel + anon memory in use, in KiB
    awk '/^(AnonPages|Slab|KernelStack|PageTables|Shmem):/ {s+=$2} END {print s}' /proc/meminfo
}
settle() { sync; echo 3 >/proc/sys/vm/drop_caches; sleep 1; }

echo "== idle memory: $IDLE sleeping containers each"
settle; before=$(meminfo_kb)
for i in $(seq "$IDLE"); do "$LTV" launch busybox "idle$i" --kind app -- sleep 3600 >/dev/null; done
settle; after=$(meminfo_kb)
ltv_kb=$(( (after - before) / IDLE ))
for i in $(seq "$IDLE"); do "$LTV" delete --force "idle$i" >/dev/null; done

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
echo "idle memory per container (kernel+anon): ltv ${ltv_kb} KiB, crun ${crun_kb} KiB"
printf '{"ltv_idle_kib": %s, "crun_idle_kib": %s, "count": %s}\n' "$ltv_kb" "$crun_kb" "$IDLE" >"$OUT/app-idle-memory.json"
