#!/usr/bin/env bash
# Boot-time and overhead benchmark: ltv-vmm vs QEMU -M microvm, same vmlinux/initrd/cmdline.
#
#   vmm/bench.sh [VMLINUX [INITRAMFS]]     (defaults: newest /var/cache/ltv/kernel/*/vmlinux,
#                                           a fresh guest-kernel/initramfs.sh cpio)
#   RUNS=1 MEM=128 SKIP_QEMU=1 SKIP_LTV=1 TIMEOUT=240 CONSOLE=1 (print console lines with
#   wall times) BASE='...' (kernel command line, default below)
#   DISK_MIB=256: virtio-blk instead: both VMMs get the same raw disk of DISK_MIB random MiB
#   (read-only) and the guest reads it sequentially with O_DIRECT (busybox dd, 1 MiB
#   blocks); reported as MiB/s over the guest's /proc/uptime around the dd.
#   KVM_COUNT=1: also KVM's tracepoint counts per MiB (perf stat on the VMM process during the
#   dd): emulated guest instructions, MMIO and port exits, interrupts, exits to the VMM.
#   Counting costs the guest time, so MiB/s are only comparable between runs alike.
#   HUGEPAGES=1: ltv-vmm's guest RAM from hugetlbfs (reserve /proc/sys/vm/nr_hugepages first).
#
# Per run it reports: wall time from exec to the first `LTV-READY` console line, wall time to
# process exit (guest `poweroff -f`), the VMM's PSS at LTV-READY minus the PSS of the guest-RAM
# mapping (the monitor's own memory), and, for ltv-vmm, CPU time from exec to the first KVM_RUN.
# Each boot has a timeout and only processes started here are ever killed.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
RUNS="${RUNS:-1}" MEM="${MEM:-128}" TIMEOUT="${TIMEOUT:-240}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-vmm}"

VMLINUX="${1:-$(ls -t /var/cache/ltv/kernel/*/vmlinux 2>/dev/null | head -1 || true)}"
[[ -f $VMLINUX ]] || { echo "no vmlinux (build guest-kernel/build.sh or pass one)" >&2; exit 1; }
mkdir -p "$CARGO_TARGET_DIR"
WORK="$(mktemp -d "$CARGO_TARGET_DIR/ltv-bench.XXXXXX")"  # not /tmp: shared hosts clean it
trap 'rm -rf "$WORK"' EXIT
INITRD="${2:-}"
EXTRA=()
DISK=""
if [[ -n ${DISK_MIB:-} ]]; then
    DISK="$WORK/disk.img"
    head -c "$((DISK_MIB << 20))" /dev/urandom >"$DISK"
    cat >"$WORK/blkbench.sh" <<EOS
#!/bin/sh
echo LTV-BLK-START
s=\$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/dev/null bs=1M count=$DISK_MIB iflag=direct 2>/dev/null
e=\$(cut -d' ' -f1 /proc/uptime)
echo "LTV-BLK $DISK_MIB \$s \$e"
reboot -f
EOS
    EXTRA=("$WORK/blkbench.sh:/blkbench.sh")
    BASE="${BASE:-console=ttyS0 reboot=k quiet ltv.init=/blkbench.sh}"
fi
if [[ -z $INITRD ]]; then
    INITRD="$WORK/initramfs.cpio"
    bash "$ROOT/guest-kernel/initramfs.sh" "$INITRD" "${EXTRA[@]}" >/dev/null
fi
cargo build -q -j1 --release -p ltv-vmm --bin ltv-vmm
VMM="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/ltv-vmm"
command -v qemu-system-x86_64 >/dev/null || SKIP_QEMU=1

# reboot=k: the guest ends by an i8042 reset (ltv-vmm exits 0, QEMU -no-reboot exits). reboot=t
# would triple-fault through `int3`, which kvm-pvm cannot emulate (KVM internal error).
BASE="${BASE:-console=ttyS0 reboot=k quiet ltv.init=poweroff}"
# ltv-vmm adds its defaults (panic=1 pci=off) and, on kvm-pvm, the compat switches; give
# QEMU exactly the command line it would boot with.
QEMU_APPEND="$("$VMM" --print-cmdline "$BASE")"

echo "vmlinux: $VMLINUX"
echo "initrd:  $INITRD ($(stat -c %s "$INITRD") bytes), memory ${MEM} MiB, 1 vCPU"

WORK="$WORK" VMM="$VMM" VMLINUX="$VMLINUX" INITRD="$INITRD" MEM="$MEM" BASE="$BASE" DISK="$DISK" \
QEMU_APPEND="$QEMU_APPEND" HUGEPAGES="${HUGEPAGES:-}" KVM_COUNT="${KVM_COUNT:-}" RUNS="$RUNS" TIMEOUT="$TIMEOUT" SKIP_QEMU="${SKIP_QEMU:-}" SKIP_LTV="${SKIP_LTV:-}" CONSOLE="${CONSOLE:-}" \
python3 - <<'PY'
import json, os, re, selectors, shutil, signal, subprocess, time
E = os.environ
mem = int(E['MEM'])

def smaps_overhead(pid):
    """(total PSS kB, guest-RAM PSS kB) from /proc/PID/smaps."""
    try:
        text = open(f'/proc/{pid}/smaps').read()
    except OSError:
        return None
    vmas = []
    for line in text.splitlines():
        m = re.match(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+ *(.*)$', line)
        if m:
            vmas.append({'start': int(m[1], 16), 'end': int(m[2], 16), 'perms': m[3],
                         'path': m[4], 'Size': 0, 'Pss': 0})
            continue
        k, _, v = line.partition(':')
        if k in ('Size', 'Pss') and vmas:
            vmas[-1][k] = int(v.split()[0])
    return sum(v['Pss'] for v in vmas), guest_ram_pss(vmas)

def guest_ram_pss(vmas):
    """PSS of the guest RAM: the smallest run of adjacent writable mappings of at least MEM MiB.
    A run, not one mapping: ltv-vmm maps the kernel and initrd files copy-on-write into its
    anonymous guest RAM mapping, which splits it."""
    images = {os.path.realpath(E['VMLINUX']), os.path.realpath(E['INITRD'])}
    best = None
    for i in range(len(vmas)):
        size = pss = 0
        for j in range(i, len(vmas)):
            v = vmas[j]
            if not v['perms'].startswith('rw') or v['path'] not in images | {''}:
                break
            if j > i and v['start'] != vmas[j - 1]['end']:
                break
            size += v['Size']; pss += v['Pss']
            if size >= mem * 1024:
                if best is None or size < best[0]:
                    best = (size, pss)
                break
    return best[1] if best else 0

# What the read costs the hypervisor, counted by KVM's tracepoints on the VMM process (debugfs'
# per-VM counters are not readable on every host). Emulated instructions are the guest kernel's
# work on kvm-pvm.
KVM_EVENTS = ['kvm:kvm_emulate_insn', 'kvm:kvm_mmio', 'kvm:kvm_pio', 'kvm:kvm_inj_exception',
              'kvm:kvm_apic_accept_irq', 'kvm:kvm_userspace_exit', 'kvm:kvm_vcpu_wakeup',
              'kvmmmu:kvm_mmu_pagetable_walk']

def kvm_count_start(pid):
    if not E.get('KVM_COUNT') or not shutil.which('perf'):
        return None
    out = f"{E['WORK']}/perf-{pid}.csv"
    p = subprocess.Popen(['perf', 'stat', '-x,', '-o', out, '-e', ','.join(KVM_EVENTS),
                          '-p', str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p, out

def kvm_count_stop(counting, per):
    p, out = counting
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill(); p.wait(); return None
    counts = {}
    for line in open(out).read().splitlines():
        f = line.split(',')
        if len(f) > 2 and f[0].isdigit():
            counts[f[2].split(':', 1)[-1]] = round(int(f[0]) / per, 1)
    return counts

def run(name, cmd, env=None):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, 'out')
    sel.register(p.stderr, selectors.EVENT_READ, 'err')
    ready = mem_at_ready = blk = counting = None
    buf = {'out': b'', 'err': b''}
    err_lines = []
    open_streams = 2
    limit = float(E['TIMEOUT'])
    while open_streams and time.monotonic() - t0 < limit:
        for key, _ in sel.select(timeout=1.0):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj); open_streams -= 1; continue
            buf[key.data] += chunk
            *lines, buf[key.data] = buf[key.data].split(b'\n')
            for l in lines:
                if key.data == 'err':
                    err_lines.append(l.decode(errors='replace'))
                elif l.startswith(b'LTV-BLK-START'):
                    counting = kvm_count_start(p.pid)
                elif l.startswith(b'LTV-BLK '):
                    mib, s, e = (float(x) for x in l.split()[1:4])
                    blk = {'read_mib': mib, 'guest_s': round(e - s, 2),
                           'mib_per_s': round(mib / max(e - s, 0.01), 2)}
                    if counting:
                        blk['kvm_events_per_mib'] = kvm_count_stop(counting, mib)
                elif ready is None and b'LTV-READY' in l:
                    ready = time.monotonic() - t0
                    mem_at_ready = smaps_overhead(p.pid)
                    # QEMU without ACPI cannot power off: the guest halts and QEMU stays up.
                    if not E.get('DISK'):
                        limit = min(limit, ready + 20)
                if E.get('CONSOLE'):
                    print(f'  {name} {time.monotonic() - t0:7.2f} {l.decode(errors="replace")}', flush=True)
    try:
        rc = p.wait(timeout=max(1, limit - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.terminate()
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill(); rc = p.wait()
        rc = f'still running {limit:.0f} s after start, terminated ({rc})'
    exit_t = time.monotonic() - t0
    ru = None
    cpu = next((l for l in err_lines if 'timing:' in l), None)
    res = {'vmm': name, 'ready_s': ready and round(ready, 2), 'exit_s': round(exit_t, 2), 'rc': rc}
    if blk:
        res['blk'] = blk
    if mem_at_ready:
        total, guest = mem_at_ready
        res.update(pss_kb=total, guest_ram_pss_kb=guest, vmm_overhead_kb=total - guest)
    if cpu:
        res['startup'] = cpu.split('timing: ', 1)[1]
    if rc != 0 or ready is None:
        res['stderr_tail'] = err_lines[-5:]
    print(json.dumps(res), flush=True)
    return res

w = E['WORK']
for i in range(int(E['RUNS'])):
    cfg = {'kernel': E['VMLINUX'], 'initrd': E['INITRD'], 'cmdline': E['BASE'],
           'memory_mib': mem, 'vcpus': 1, 'console_log': f'{w}/ltv-console.log',
           'console_stdout': True, 'hugepages': bool(E.get('HUGEPAGES'))}
    disk = E.get('DISK')
    if disk:
        cfg['disks'] = [{'path': disk, 'read_only': True}]
    json.dump(cfg, open(f'{w}/vm.json', 'w'))
    env = dict(os.environ, LTV_VMM_TIMING='1')
    if not E.get('SKIP_LTV'):
        run('ltv-vmm', [E['VMM'], '--config', f'{w}/vm.json'], env)
    if not E.get('SKIP_QEMU'):
        run('qemu-microvm', ['qemu-system-x86_64', '-M', 'microvm,acpi=off,x-option-roms=off',
             # kvm-pvm refuses MSR_IA32_ARCH_CAPABILITIES (0x10a), which QEMU asserts on.
             '-enable-kvm', '-cpu', 'host,-arch-capabilities', '-m', str(mem), '-smp', '1', '-nodefaults',
             '-no-user-config', '-nographic', '-no-reboot', '-serial', 'stdio',
             '-kernel', E['VMLINUX'], '-initrd', E['INITRD'], '-append', E['QEMU_APPEND']]
            + (['-drive', f'id=d0,file={disk},format=raw,if=none,readonly=on',
                '-device', 'virtio-blk-device,drive=d0'] if disk else []))
PY
