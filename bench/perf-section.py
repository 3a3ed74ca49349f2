#!/usr/bin/env python3
"""Prints the README's `ltv bench` tables from two runs of the same suites.

    bench/perf-section.py --start OUT1 OUT2 [--start OUT1 OUT2 ...] [--peers-alone OUT ...]
        --density OUT1 OUT2 [--density-peers OUT1 OUT2 ...]

Each OUT is a `--out` directory of `ltv bench` (results.json). Medians of the two runs
side by side, each ltv kind's ratio to its peer, and run 2 / run 1. Each table says how
it was run (pause before each start operation, the instances' network). --peers-alone
is a start run without ltv kinds (`--kinds ''`): the peers alone, undisturbed (one line
per run given).
"""

import argparse
import datetime
import json
import os


def load(d):
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def p50(r, subject, metric):
    for s in r["series"]:
        if s["subject"] == subject and s["metric"] == metric and s["samples"]:
            return s["summary"]["p50"]
    return None


def fmt(v, unit=""):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}{unit}"
    return f"{v:.1f}{unit}"


def drift(a, b):
    if a is None or b is None or a == 0:
        return "–"
    return f"{(b / a - 1) * 100:+.0f} %"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return ""
    return f" ({a / b:.2f}×)"


def env_line(r):
    e = r["environment"]
    when = datetime.datetime.fromtimestamp(r["started_unix"], datetime.timezone.utc)
    tools = e.get("tools", {})
    return (
        f"{when:%Y-%m-%d %H:%M} UTC, host `{e['hostname']}`: {e['cpus']} CPUs ({e['cpu_model']}), "
        f"{e['mem_total_kib'] // 1024} MiB, kernel {e['kernel']}, KVM {e['kvm']}, "
        f"cgroup {e['cgroup']}; crun {tools.get('crun', '?').split()[-1]}, "
        f"LXC {tools.get('lxc-start', '?')}"
    )


def how(r):
    a = r.get("args", {})
    out = f"network `{a.get('network', 'bridge')}`"
    if r.get("suite") == "start":
        out = f"pause before each operation {a.get('settle_ms', 0)} ms, " + out
    return out


def start_table(r1, r2):
    rows = [
        ("app", "run", "crun", "`ltv run --rm busybox -- /bin/true` vs `crun run`"),
        ("app", "launch+exec", None, "app: `launch` until `exec -- /bin/true` returned"),
        ("app", "delete", None, "app: `delete --force` of a running instance"),
        ("system", "launch+exec", "lxc",
         "system: `launch` until `exec -- /bin/true` returned vs `lxc-start -d` + `lxc-attach -- /bin/true`"),
        ("system", "delete", "lxc", "system: `delete --force` vs `lxc-stop -k`"),
        ("crun", "run", None, "crun `run` /bin/true (peer)"),
        ("lxc", "launch+exec", None, "LXC start + attach (peer)"),
        ("lxc", "delete", None, "LXC `lxc-stop -k` (peer)"),
    ]
    out = f"| start, median ms ({how(r1)}) | run 1 | run 2 | run 2 / run 1 |\n|---|---|---|---|\n"
    for subj, metric, peer, label in rows:
        a, b = p50(r1, subj, metric), p50(r2, subj, metric)
        pa = p50(r1, peer, metric) if peer else None
        pb = p50(r2, peer, metric) if peer else None
        out += f"| {label} | {fmt(a)}{ratio(a, pa)} | {fmt(b)}{ratio(b, pb)} | {drift(a, b)} |\n"
    return out


def density_last(r, subject):
    d = r["results"].get("density", {}).get(subject)
    if not d or not d["points"]:
        return None
    last = d["points"][-1]
    td = d.get("teardown_host_kib_per_instance")
    up = last["host_kib_per_instance"]
    return {
        "count": last["count"],
        "up": up,
        "down": td,
        "mean": (up + td) / 2 if td is not None else None,
        "cgroup": last["cgroup_kib_per_instance"],
        "helpers": last["helpers"],
        "helpers_pss": last["helpers_pss_kib_total"],
        "launch": p50(r, subject, "launch (idle, detached)"),
    }


def density_table(r1, r2, subjects, peer_of):
    out = (
        f"| density ({how(r1)}) | count | host KiB/inst: up, down, **mean** (run 1) | run 2 | cgroup KiB/inst median: run 1 | run 2 "
        "| launch p50 ms: run 1 | run 2 |\n|---|---|---|---|---|---|---|---|\n"
    )
    for s in subjects:
        a, b = density_last(r1, s), density_last(r2, s)
        if a is None or b is None:
            continue
        p = peer_of.get(s)
        pa = density_last(r1, p) if p else None
        pb = density_last(r2, p) if p else None

        def host(x, px):
            return f"{fmt(x['up'])}, {fmt(x['down'])}, **{fmt(x['mean'])}**" + (
                ratio(x["mean"], px["mean"]) if px else ""
            )

        out += (
            f"| {s} | {a['count']} | {host(a, pa)} | {host(b, pb)} ({drift(a['mean'], b['mean'])}) "
            f"| {fmt(a['cgroup'])}{ratio(a['cgroup'], pa['cgroup']) if pa else ''} "
            f"| {fmt(b['cgroup'])}{ratio(b['cgroup'], pb['cgroup']) if pb else ''} ({drift(a['cgroup'], b['cgroup'])}) "
            f"| {fmt(a['launch'])}{ratio(a['launch'], pa['launch']) if pa else ''} "
            f"| {fmt(b['launch'])}{ratio(b['launch'], pb['launch']) if pb else ''} ({drift(a['launch'], b['launch'])}) |\n"
        )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--start", nargs=2, action="append", required=True)
    ap.add_argument("--peers-alone", action="append", default=[])
    ap.add_argument("--density", nargs=2, required=True)
    # Density runs with peers: each ltv kind next to its peer (app-crun, system-lxc).
    ap.add_argument("--density-peers", nargs=2, action="append", default=[])
    a = ap.parse_args()
    starts = [(load(x), load(y)) for x, y in a.start]
    d1, d2 = load(a.density[0]), load(a.density[1])
    last = max(r["started_unix"] for pair in starts for r in pair)
    t2 = datetime.datetime.fromtimestamp(last, datetime.timezone.utc)
    print(f"First run: {env_line(starts[0][0])}. Last run: {t2:%Y-%m-%d %H:%M} UTC, same host.\n")
    for s1, s2 in starts:
        print(start_table(s1, s2))
    for r in map(load, a.peers_alone):
        print(
            f"Peers alone ({how(r)}, no ltv in the run): crun `run` {fmt(p50(r, 'crun', 'run'))} ms, "
            f"LXC start + attach {fmt(p50(r, 'lxc', 'launch+exec'))} ms, "
            f"`lxc-stop -k` {fmt(p50(r, 'lxc', 'delete'))} ms.\n"
        )
    print(density_table(d1, d2, ["app", "system"], {}))
    for l1, l2 in (tuple(map(load, pair)) for pair in a.density_peers):
        present = [s for s in ("app", "crun", "system", "lxc") if density_last(l1, s)]
        peer_of = {k: p for k, p in (("app", "crun"), ("system", "lxc")) if p in present}
        print(density_table(l1, l2, present, peer_of))


if __name__ == "__main__":
    main()
