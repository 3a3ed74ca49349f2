#!/usr/bin/env python3
"""Boot the guest kernel under QEMU microvm and time it (a test aid, not used by the VMM).

    guest-kernel/boot-qemu.py VMLINUX INITRAMFS [--append EXTRA] [--timeout S] [--smp N] [--log FILE]

Prints every console line prefixed with the wall time since QEMU was started,
reports start->LTV-READY and start->QEMU exit, and exits non-zero if
LTV-READY never shows up or QEMU does not exit by itself before the timeout
(use `--append ltv.init=poweroff` for a self-terminating boot).
Only the QEMU process this script started is ever killed.
"""
import argparse, os, selectors, signal, subprocess, sys, time

COMPAT = 'noxsave clearcpuid=popcnt,cx16,smap,smep,pku,umip nopku nopv ltv_pvm_compat'

ap = argparse.ArgumentParser()
ap.add_argument('vmlinux')
ap.add_argument('initramfs')
ap.add_argument('--append', default='')
ap.add_argument('--base', default='console=ttyS0 reboot=t quiet ' + COMPAT,
                help='base kernel command line (default: %(default)s)')
ap.add_argument('--timeout', type=float, default=180)
ap.add_argument('--smp', type=int, default=1)
ap.add_argument('--mem', default='128')
ap.add_argument('--machine', default='microvm,acpi=off,x-option-roms=off')
ap.add_argument('--cpu', default='host,-arch-capabilities')
ap.add_argument('--qemu-extra', default='', help='extra QEMU arguments')
ap.add_argument('--log')
a = ap.parse_args()

cmd = ['qemu-system-x86_64', '-M', a.machine, '-enable-kvm', '-cpu', a.cpu,
       '-m', a.mem, '-smp', str(a.smp), '-nodefaults', '-no-user-config', '-nographic',
       '-no-reboot', '-serial', 'stdio', *a.qemu_extra.split(), '-kernel', a.vmlinux, '-initrd', a.initramfs,
       '-append', (a.base + ' ' + a.append).strip()]
print('#', ' '.join(repr(c) if ' ' in c else c for c in cmd), flush=True)
log = open(a.log, 'w') if a.log else None
t0 = time.monotonic()
p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT)
sel = selectors.DefaultSelector()
sel.register(p.stdout, selectors.EVENT_READ)
buf, ready, ready_cpu, rc = b'', None, None, None


def qemu_cpu(pid):
    """user+system CPU seconds QEMU has used so far: on a busy shared host the
    wall time mostly measures the other load, this measures the guest's work."""
    try:
        f = open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return float('nan')


try:
    while True:
        left = a.timeout - (time.monotonic() - t0)
        if left <= 0:
            break
        if not sel.select(timeout=min(left, 1.0)):
            if p.poll() is not None:
                break
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        while b'\n' in buf:
            line, buf = buf.split(b'\n', 1)
            s = line.decode(errors='replace').rstrip('\r')
            out = '%8.3f %s' % (time.monotonic() - t0, s)
            print(out, flush=True)
            if log:
                print(out, file=log, flush=True)
            if ready is None and 'LTV-READY' in s:
                ready = time.monotonic() - t0
                ready_cpu = qemu_cpu(p.pid)
                print('### start->LTV-READY: %.2f s wall, QEMU CPU time %.2f s'
                      % (ready, ready_cpu), flush=True)
    if buf:
        print('%8.3f %s' % (time.monotonic() - t0, buf.decode(errors='replace')), flush=True)
    try:
        rc = p.wait(timeout=max(0.1, a.timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        rc = None
finally:
    if p.poll() is None:
        print('### timeout: killing QEMU pid %d' % p.pid, flush=True)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
end = time.monotonic() - t0
print('### LTV-READY: %s (QEMU CPU %s); QEMU exited by itself: %s (rc=%s) at %.2f s'
      % ('%.2f s' % ready if ready is not None else 'never',
         '%.2f s' % ready_cpu if ready_cpu is not None else '-', rc is not None, rc, end),
      flush=True)
sys.exit(0 if ready is not None and rc is not None else 1)
