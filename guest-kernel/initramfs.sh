#!/usr/bin/env bash
# Build the Lightervisor guest initramfs: an UNCOMPRESSED newc cpio holding
# /init (init.c, a freestanding static program), Debian's static busybox and
# its applet symlinks.
#
#   guest-kernel/initramfs.sh [--no-busybox] OUTPUT.cpio [EXTRA[:GUEST_PATH]]...
#
# EXTRA files (e.g. the static `ltv` binary) are added with mode 0755 at
# GUEST_PATH (default /bin/<basename>).  --no-busybox leaves busybox out (the
# archive is then ~10 KB instead of ~2 MB: on kvm-pvm hosts the kernel spends
# seconds per MB unpacking, see README).  No root needed: the archive is
# written directly (device nodes included) with fixed owners and mtimes, so
# the same inputs give the same bytes.
#
# /init (see init.c) mounts /proc, /sys, /dev (devtmpfs), /dev/pts and cgroup v2
# at /sys/fs/cgroup with direct system calls (no fork: every fork costs about
# a second on kvm-pvm hosts), prints `LTV-READY` on the console, then acts on
# `ltv.init=` from the kernel command line:
#   ltv.init=poweroff  -> reboot(RESTART): the way a microVM ends (no power-off
#   ltv.init=reboot       device); with reboot=k the VMM sees the i8042 reset
#   ltv.init=halt      -> reboot(POWER_OFF): the kernel only halts
#   ltv.init=/path     -> exec /path
#   otherwise          -> exec /bin/sh on the console
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { echo "usage: $0 [--no-busybox] OUTPUT.cpio [EXTRA[:GUEST_PATH]]..." >&2; exit 2; }
BUSYBOX=/bin/busybox
if [[ ${1:-} == --no-busybox ]]; then BUSYBOX=""; shift; fi
(($# >= 1)) || usage
OUT="$1"; shift

apt_need() {   # apt_need PACKAGE...: install the ones that are missing
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    echo "[initramfs] apt-get install ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
}
apt_need gcc libc6-dev python3
[[ -z $BUSYBOX ]] || apt_need busybox-static

tmp="$(mktemp "$(dirname "$OUT")/.initramfs.XXXXXX")"
init_bin="$(mktemp /tmp/ltv-init.XXXXXX)"
trap 'rm -f "$tmp" "$init_bin"' EXIT
# The flags api/build.rs builds it with too (for the daemon's root disks).
read -ra cflags <"$HERE/init.cflags"
gcc "${cflags[@]}" \
    -DPVM_GLIBC_TUNABLES="\"$(cat "$HERE/../api/src/daemon/pvm-glibc-tunables")\"" \
    -o "$init_bin" "$HERE/init.c"
INIT_BIN="$init_bin" python3 - "$tmp" "$BUSYBOX" "$@" <<'PY'
import os, subprocess, sys

out, busybox, extras = sys.argv[1], sys.argv[2], sys.argv[3:]
entries = []          # (name, mode, data, rdev)

def add(name, mode, data=b'', rdev=(0, 0)):
    entries.append((name.lstrip('/'), mode, data, rdev))

for d in ['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'dev', 'proc', 'sys',
          'etc', 'tmp', 'run', 'root', 'mnt']:
    add(d, 0o040755 if d != 'tmp' else 0o041777)
add('dev/console', 0o020600, rdev=(5, 1))
add('dev/null', 0o020666, rdev=(1, 3))
if busybox:
    add('bin/busybox', 0o100755, open(busybox, 'rb').read())
    applets = subprocess.run([busybox, '--list'], check=True, capture_output=True,
                             text=True).stdout.split()
    for a in sorted(set(applets)):
        if a != 'busybox':
            add('bin/' + a, 0o120777, b'busybox')
add('init', 0o100755, open(os.environ['INIT_BIN'], 'rb').read())
add('etc/passwd', 0o100644, b'root:x:0:0:root:/root:/bin/sh\n')
add('etc/group', 0o100644, b'root:x:0:\n')
for e in extras:
    src, _, dst = e.partition(':')
    dst = dst or '/bin/' + os.path.basename(src)
    # make sure parent directories exist in the archive
    parts = dst.strip('/').split('/')[:-1]
    for i in range(1, len(parts) + 1):
        p = '/'.join(parts[:i])
        if not any(n == p for n, *_ in entries):
            add(p, 0o040755)
    entries = [x for x in entries if x[0] != dst.lstrip('/')]
    add(dst, 0o100755, open(src, 'rb').read())

def pad4(n):
    return b'\0' * ((4 - n % 4) % 4)

with open(out, 'wb') as f:
    ino = 1
    for name, mode, data, (rmaj, rmin) in entries + [('TRAILER!!!', 0, b'', (0, 0))]:
        nb = name.encode() + b'\0'
        nlink = 2 if mode & 0o170000 == 0o040000 else 1
        hdr = '070701' + ''.join('%08X' % v for v in (
            ino if name != 'TRAILER!!!' else 0, mode, 0, 0, nlink, 0,
            len(data), 0, 0, rmaj, rmin, len(nb), 0))
        f.write(hdr.encode() + nb + pad4(110 + len(nb)) + data + pad4(len(data)))
        ino += 1
print(f'[initramfs] {len(entries)} entries', file=sys.stderr)
PY
chmod 0644 "$tmp"
mv -f "$tmp" "$OUT"
rm -f "$init_bin"
trap - EXIT
echo "[initramfs] wrote $OUT ($(stat -c %s "$OUT") bytes)" >&2
