#!/usr/bin/env bash
# Build the Lightervisor guest kernel (an uncompressed, PVH-bootable vmlinux).
#
#   guest-kernel/build.sh            # prints the cached vmlinux path as the last stdout line
#
# Inputs: Debian's linux-source-6.12 package, config.fragment, patches/*.patch
# and this script.  The output is cached under
#   ${LTV_CACHE_DIR:-/var/cache/ltv}/kernel/<sha256 of the inputs>/vmlinux
# and a second run with the same inputs returns at once.  The source tree and
# the build objects live in ${LTV_CACHE_DIR}/kernel/work (never in the repo)
# and are reused incrementally between builds.
#
# Environment: LTV_CACHE_DIR (default /var/cache/ltv), LTV_KERNEL_JOBS
# (default: nproc).  Progress goes to stderr; only the path goes to stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/config.fragment"
PATCH_DIR="$HERE/patches"
SRC_PKG=linux-source-6.12
SRC_TARBALL=/usr/src/linux-source-6.12.tar.xz
CACHE="${LTV_CACHE_DIR:-/var/cache/ltv}/kernel"
JOBS="${LTV_KERNEL_JOBS:-$(nproc)}"
STAGES=7

say() { printf '[guest-kernel %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
stage() { say "stage $1/$STAGES: $2"; }
die() { say "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- 1. tools
stage 1 "build dependencies"
need_pkgs=()
for p in "$SRC_PKG" build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils \
         python3 util-linux; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
        || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    say "apt-get install ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need_pkgs[@]}" >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q "${need_pkgs[@]}" >&2; }
fi
[[ -r $SRC_TARBALL ]] || die "$SRC_TARBALL missing"
SRC_VERSION="$(dpkg-query -W -f='${Version}' "$SRC_PKG")"

# ---------------------------------------------------------------- 2. cache key
stage 2 "cache key"
mapfile -t PATCHES < <(find "$PATCH_DIR" -maxdepth 1 -name '*.patch' -type f | LC_ALL=C sort)
KEY="$(
    {
        printf 'linux-source %s %s\n' "$SRC_PKG" "$SRC_VERSION"
        printf '== fragment\n'; cat "$FRAGMENT"
        for p in "${PATCHES[@]}"; do printf '== patch %s\n' "$(basename "$p")"; cat "$p"; done
        printf '== build.sh\n'; cat "$HERE/build.sh"
    } | sha256sum | cut -d' ' -f1
)"
OUT_DIR="$CACHE/$KEY"
OUT="$OUT_DIR/vmlinux"
if [[ -f $OUT ]]; then
    say "cached: $SRC_PKG $SRC_VERSION, key $KEY"
    echo "$OUT"
    exit 0
fi
say "not cached (key $KEY); building $SRC_PKG $SRC_VERSION with -j$JOBS"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock -n 9 || { say "another build holds $CACHE/.lock; waiting"; flock 9; }
if [[ -f $OUT ]]; then echo "$OUT"; exit 0; fi   # built by the other holder

WORK="$CACHE/work"
SRC="$WORK/linux"
STATE="$WORK/state"        # "clean <version>" when SRC is usable
APPLIED="$WORK/applied"    # copies of the patches applied to SRC, in order
LOG="$WORK/build.log"
MAKE_PID=""
TMP_OUT=""

cleanup() {
    local rc=$?
    if [[ -n $MAKE_PID ]] && kill -0 "$MAKE_PID" 2>/dev/null; then
        kill -TERM "$MAKE_PID" 2>/dev/null || true
        wait "$MAKE_PID" 2>/dev/null || true
    fi
    [[ -n $TMP_OUT ]] && rm -f "$TMP_OUT"
    if ((rc != 0)); then say "failed or interrupted (rc=$rc); log: $LOG"; fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM HUP

# ---------------------------------------------------------------- 3. source tree
stage 3 "source tree in $SRC"
mkdir -p "$WORK"
# Files the old and new patch sets touch: remember their content hash and
# mtime, so that a file that ends up with the same content after revert +
# re-apply gets its old mtime back (otherwise touching e.g. asm/setup.h would
# rebuild most of the kernel).
patched_files() { sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$@" 2>/dev/null | sort -u; }
MTIMES="$WORK/mtimes"
: >"$MTIMES.new"
if [[ -d $SRC ]]; then
    while read -r f; do
        [[ -f $SRC/$f ]] && printf '%s %s %s\n' "$(sha256sum <"$SRC/$f" | cut -c1-64)" \
            "$(stat -c %Y "$SRC/$f")" "$f" >>"$MTIMES.new"
    done < <(patched_files "$APPLIED"/*.patch "${PATCHES[@]}")
fi
mv "$MTIMES.new" "$MTIMES"

state_ok=0
if [[ -f $STATE && "$(cat "$STATE")" == "clean $SRC_VERSION" && -d $SRC ]]; then
    # Revert the previous patch set (newest first) unless it is the same one.
    if [[ -d $APPLIED ]] && ! diff -rq "$APPLIED" "$PATCH_DIR" --exclude='*~' >/dev/null 2>&1; then
        echo dirty >"$STATE"
        ok=1
        mapfile -t old < <(find "$APPLIED" -maxdepth 1 -name '*.patch' | LC_ALL=C sort -r)
        for p in "${old[@]}"; do
            say "reverting $(basename "$p")"
            patch -s -R -p1 -d "$SRC" <"$p" >&2 || { ok=0; break; }
        done
        if ((ok)); then rm -rf "$APPLIED"; echo "clean $SRC_VERSION" >"$STATE"; state_ok=1; fi
    else
        state_ok=1
    fi
fi
if ((!state_ok)); then
    say "extracting $SRC_TARBALL"
    rm -rf "$SRC" "$SRC.tmp" "$APPLIED"
    mkdir -p "$SRC.tmp"
    tar -xf "$SRC_TARBALL" -C "$SRC.tmp" --strip-components=1
    mv "$SRC.tmp" "$SRC"
    echo "clean $SRC_VERSION" >"$STATE"
fi

# ---------------------------------------------------------------- 4. patches
stage 4 "patches (${#PATCHES[@]})"
if [[ ! -d $APPLIED ]]; then
    echo dirty >"$STATE"
    for p in "${PATCHES[@]}"; do
        say "applying $(basename "$p")"
        patch -s -p1 -d "$SRC" <"$p" >&2 || die "patch $(basename "$p") failed"
    done
    mkdir -p "$APPLIED.tmp"
    ((${#PATCHES[@]})) && cp "${PATCHES[@]}" "$APPLIED.tmp/"
    mv "$APPLIED.tmp" "$APPLIED"
    echo "clean $SRC_VERSION" >"$STATE"
    while read -r sum mtime f; do
        if [[ -f $SRC/$f && "$(sha256sum <"$SRC/$f" | cut -c1-64)" == "$sum" ]]; then
            touch -d "@$mtime" "$SRC/$f"
        fi
    done <"$MTIMES"
else
    say "patch set already applied"
fi

# ---------------------------------------------------------------- 5. config
stage 5 "config: tinyconfig + config.fragment + olddefconfig"
: >"$LOG"
(
    cd "$SRC"
    make tinyconfig
    scripts/kconfig/merge_config.sh -m .config "$FRAGMENT"
    make olddefconfig
) >>"$LOG" 2>&1 || die "config failed, see $LOG"

# Every option the fragment sets must have survived olddefconfig: dependencies
# silently drop options.
python3 - "$FRAGMENT" "$SRC/.config" >&2 <<'PY' || die "config verification failed"
import re, sys
frag, conf = sys.argv[1], sys.argv[2]
have = {}
for line in open(conf):
    m = re.match(r'(CONFIG_\w+)=(.*)', line)
    if m: have[m[1]] = m[2]
bad, n = [], 0
for line in open(frag):
    line = line.strip()
    m = re.match(r'(CONFIG_\w+)=(.*)$', line)
    if m:
        n += 1
        if have.get(m[1]) != m[2]:
            bad.append(f'{m[1]}: wanted {m[2]}, got {have.get(m[1], "not set")}')
        continue
    m = re.match(r'# (CONFIG_\w+) is not set$', line)
    if m:
        n += 1
        if have.get(m[1]) in ('y', 'm'):
            bad.append(f'{m[1]}: wanted off, got {have[m[1]]}')
for b in bad: print('  config mismatch:', b)
print(f'  checked {n} options from config.fragment, {len(bad)} mismatches')
sys.exit(1 if bad else 0)
PY

# ---------------------------------------------------------------- 6. make
stage 6 "make -j$JOBS vmlinux (log: $LOG)"
start=$(date +%s)
( cd "$SRC" && exec make -j"$JOBS" vmlinux ) >>"$LOG" 2>&1 &
MAKE_PID=$!
while kill -0 "$MAKE_PID" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$MAKE_PID" 2>/dev/null || break; sleep 1; done
    kill -0 "$MAKE_PID" 2>/dev/null || break
    n=$(grep -cE '^  (CC|AS|LD|AR)' "$LOG" || true)
    say "  ... $(( $(date +%s) - start ))s, $n objects built; last: $(tail -n1 "$LOG" | cut -c1-70)"
done
rc=0; wait "$MAKE_PID" || rc=$?
MAKE_PID=""
((rc == 0)) || { tail -n 30 "$LOG" >&2; die "make failed (rc=$rc), see $LOG"; }
say "make done in $(( $(date +%s) - start ))s"

# ---------------------------------------------------------------- 7. install
stage 7 "install into $OUT_DIR"
mkdir -p "$OUT_DIR"
TMP_OUT="$OUT_DIR/.vmlinux.tmp.$$"
cp "$SRC/vmlinux" "$TMP_OUT"
cp "$SRC/.config" "$OUT_DIR/config"
printf '%s %s\n' "$SRC_PKG" "$SRC_VERSION" >"$OUT_DIR/source-version"
mv -f "$TMP_OUT" "$OUT"
TMP_OUT=""
say "done: $(du -h "$OUT" | cut -f1) vmlinux"
echo "$OUT"
