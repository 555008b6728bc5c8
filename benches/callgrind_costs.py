#!/usr/bin/env python3
"""Per-request costs from callgrind profiles written with --dump-instr=yes --cache-sim=yes
(see benches/callgrind.sh): instructions, locked instructions, and simulated cache misses.

usage: callgrind_costs.py REQUESTS SITES NAME=PROFILE...

A locked instruction is one with a `lock` prefix, an `xchg` with a memory operand (locked
without the prefix) or an `mfence`: the instructions atomic read-modify-writes and
sequentially consistent stores compile to. They are found by disassembling each object
the profile names (objdump) at the addresses callgrind recorded, which are the objects'
own addresses. SITES > 0 also lists the first profile's busiest locked instructions
(in any object it ran: its binary, libc), with their call chains (addr2line, inlined
frames included).
"""
import collections
import re
import subprocess
import sys


def parse(path):
    """Self cost per (object, instruction address), and the profile's event totals."""
    names = {}
    cost = collections.Counter()
    events, totals = [], []
    npos = 1
    obj = None
    pos = 0
    skip_next = False
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            c = line[0]
            if c.isdigit() or c in "+-*":
                parts = line.split()
                p = parts[0]
                if p.startswith("0x"):
                    pos = int(p, 16)
                elif p[0] == "+":
                    pos += int(p[1:], 0)
                elif p[0] == "-":
                    pos -= int(p[1:], 0)
                elif p != "*":
                    pos = int(p, 0)
                if skip_next:
                    # The line after `calls=` is the call's inclusive cost: not this
                    # instruction's own.
                    skip_next = False
                    continue
                if len(parts) > npos:
                    cost[(obj, pos)] += int(parts[npos])
                continue
            if line.startswith("positions:"):
                npos = len(line.split()) - 1
            elif line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("totals:"):
                totals = [int(x) for x in line.split()[1:]]
            elif line.startswith("calls="):
                skip_next = True
            elif line.startswith("ob=") or line.startswith("cob="):
                m = re.match(r"c?ob=\((\d+)\)(?: (.*))?", line)
                if m:
                    if m.group(2) is not None:
                        names[m.group(1)] = m.group(2)
                    if line.startswith("ob="):
                        obj = names.get(m.group(1))
                else:
                    if line.startswith("ob="):
                        obj = line[3:]
    return cost, dict(zip(events, totals))


_locked = {}


def locked_instructions(obj):
    """Address -> instruction text, for the locked instructions of an object file."""
    if obj not in _locked:
        found = {}
        try:
            out = subprocess.run(
                ["objdump", "-d", "--no-show-raw-insn", "-M", "intel", obj],
                capture_output=True, text=True, check=False,
            ).stdout
        except OSError:
            out = ""
        for line in out.splitlines():
            m = re.match(r"\s*([0-9a-f]+):\s+(.*)", line)
            if not m:
                continue
            ins = m.group(2).strip()
            if ins.startswith("lock ") or ins.startswith("mfence") or (
                ins.startswith("xchg") and "PTR" in ins
            ):
                found[int(m.group(1), 16)] = ins
        _locked[obj] = found
    return _locked[obj]


def chain(obj, addr):
    """The call chain at an address, innermost first, without the atomics' own frames."""
    out = subprocess.run(
        ["addr2line", "-e", obj, "-f", "-i", "-C", hex(addr)],
        capture_output=True, text=True, check=False,
    ).stdout.splitlines()
    frames = []
    for i in range(0, len(out) - 1, 2):
        where = "/".join(out[i + 1].split("/")[-2:])
        if "sync/atomic.rs" in where or "/atomic.rs" in where:
            continue
        frames.append(f"{where} ({out[i][:60]})")
    return " <- ".join(frames[:4])


def main():
    requests, sites = int(sys.argv[1]), int(sys.argv[2])
    rows = []
    first = None
    for arg in sys.argv[3:]:
        name, _, path = arg.partition("=")
        cost, totals = parse(path)
        locked = 0
        per_site = collections.Counter()
        for (obj, addr), n in cost.items():
            if not obj or not obj.startswith("/"):
                continue
            if addr in locked_instructions(obj):
                locked += n
                per_site[(obj, addr)] += n
        rows.append((name, totals, locked))
        if first is None:
            first = (name, per_site)

    def per(totals, *keys):
        return sum(totals.get(k, 0) for k in keys) / requests

    print(f"per request, {requests} requests (callgrind; caches simulated):")
    print(f"{'proxy':10} {'instructions':>12} {'locked':>7} {'I1 miss':>8} {'D1 miss':>8} {'LL miss':>8}")
    for name, totals, locked in rows:
        print(
            f"{name:10} {per(totals, 'Ir'):12.0f} {locked / requests:7.1f} "
            f"{per(totals, 'I1mr'):8.0f} {per(totals, 'D1mr', 'D1mw'):8.0f} "
            f"{per(totals, 'ILmr', 'DLmr', 'DLmw'):8.1f}"
        )
    if sites > 0 and first:
        name, per_site = first
        print(f"\n{name}: busiest locked instructions (per request, call chain innermost first)")
        for (obj, addr), n in per_site.most_common(sites):
            ins = locked_instructions(obj)[addr]
            print(f"{n / requests:6.2f}  {ins.split(',')[0][:28]:28}  {chain(obj, addr)}")


if __name__ == "__main__":
    main()
