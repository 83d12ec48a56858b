#!/usr/bin/env python3
"""Where the well-behaved client's slow round trips in the fairness bench go, from a trace
of CPU 0 (where the bench runs the server and the well-behaved client).

Record (root; the bench binary as `cargo bench --no-run -p benches --bench fairness` names it):

    perf record -e sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_sendto,\\
syscalls:sys_exit_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom \\
        -C 0 -m 8192 -o fairness.data -- target/release/deps/fairness-<hash> --bench
    perf script -i fairness.data -F comm,tid,cpu,time,event,trace | \\
        python3 benches/tools/fairness_trace.py

Each round trip of the thread named `well-behaved` (its `sendto` to the echo's `recvfrom`
of 17 bytes) is split at the server's `recvfrom` on that connection and the server's
`sendto` of the echo:

    to server: the message waits to be read  (who held CPU 0 meanwhile?)
    server:    read -> echo written
    to client: the echo waits to be read     (who held CPU 0 meanwhile?)

For the round trips slower than 3x the quiet p99 under attack, the time is summed by who
held CPU 0: the server thread that then read the message (it was running other
connections' turns first), another server thread, nobody (CPU 0 idle: the server asleep),
the client itself, kernel threads.  Standard library only.
"""
import re
import sys
from collections import defaultdict

CLIENT = "well-behaved"
QUIET = 1000  # the bench's quiet echoes before the attack
ECHO_BYTES = 17  # 16 bytes and the newline

LINE = re.compile(r"^\s*(.*?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> "
    r"next_comm=(.*?) next_pid=(\d+)"
)
FD = re.compile(r"fd: 0x([0-9a-f]+)")
RET = re.compile(r"0x([0-9a-f]+)$")


def percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    i = q * (len(v) - 1)
    lo = int(i)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (i - lo)


def main():
    events = []
    names = {}
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        _, tid, _, t, event, rest = m.groups()
        events.append((float(t), int(tid), event, rest))
        if event == "sched:sched_switch":
            s = SWITCH.search(rest)
            if s:
                names[int(s.group(2))] = s.group(1)
                names[int(s.group(5))] = s.group(4)
    client = next((tid for tid, n in names.items() if n == CLIENT), None)
    if client is None:
        sys.exit(f"no thread named {CLIENT!r} in the trace (recorded with -C 0?)")
    server_threads = {tid for tid, n in names.items() if n.startswith("tokio")}

    # The server's descriptor for the client's connection: the first server sendto after the
    # client's first one (before the attack the server has no other peer).
    server_fd = None
    for i, (t, tid, event, rest) in enumerate(events):
        if event == "syscalls:sys_enter_sendto" and tid == client:
            for _, tid2, event2, rest2 in events[i + 1:]:
                if event2 == "syscalls:sys_enter_sendto" and tid2 in server_threads:
                    server_fd = FD.search(rest2).group(1)
                    break
            break
    if server_fd is None:
        sys.exit("no echo from the server in the trace")

    on_cpu = []  # (from, to, tid)
    running, since = None, 0.0
    trips, trip, reading_fd = [], None, {}
    for t, tid, event, rest in events:
        if event == "sched:sched_switch":
            if running is not None:
                on_cpu.append((since, t, running))
            running, since = int(SWITCH.search(rest).group(5)), t
        elif event == "syscalls:sys_enter_sendto":
            if tid == client:
                trip = {"sent": t}
            elif trip and "read" in trip and "echo" not in trip:
                if FD.search(rest).group(1) == server_fd:
                    trip["echo"] = t
        elif event == "syscalls:sys_enter_recvfrom":
            reading_fd[tid] = FD.search(rest).group(1)
            if trip and tid != client and "read" not in trip and reading_fd[tid] == server_fd:
                trip["read"], trip["reader"] = t, tid
        elif event == "syscalls:sys_exit_recvfrom" and tid == client and trip and "echo" in trip:
            r = RET.search(rest)
            if r and int(r.group(1), 16) == ECHO_BYTES:
                trip["back"] = t
                trips.append(trip)
                trip = None
    on_cpu.sort()

    def held(a, b):
        out = defaultdict(float)
        for start, end, tid in on_cpu:
            if end <= a:
                continue
            if start >= b:
                break
            out[tid] += min(end, b) - max(start, a)
        return out

    us = 1e6
    quiet, attacked = trips[:QUIET], trips[QUIET + 5:]
    for label, part in (("quiet", quiet), ("under attack", attacked)):
        print(f"{label}: {len(part)} round trips (µs)")
        for name, a, b in (
            ("round trip", "sent", "back"),
            ("to server", "sent", "read"),
            ("server", "read", "echo"),
            ("to client", "echo", "back"),
        ):
            v = [c[b] - c[a] for c in part]
            print(
                f"  {name:11s} p50 {percentile(v, .5) * us:8.1f}  p90 {percentile(v, .9) * us:8.1f}"
                f"  p99 {percentile(v, .99) * us:8.1f}  max {max(v) * us:8.1f}"
            )
    bound = 3 * percentile([c["back"] - c["sent"] for c in quiet], 0.99)
    slow = [c for c in attacked if c["back"] - c["sent"] > bound]
    total = sum(c["back"] - c["sent"] for c in slow)
    shares = defaultdict(float)
    for c in slow:
        for tid, d in held(c["sent"], c["read"]).items():
            if tid == c["reader"]:
                who = "to server: the reading server thread running other connections first"
            elif tid in server_threads:
                who = "to server: another server thread on CPU 0 while the reader waits"
            elif tid == 0:
                who = "to server: CPU 0 idle (the server asleep)"
            elif tid == client:
                who = "to server: the client itself (its send)"
            else:
                who = f"to server: {names.get(tid, tid)}"
            shares[who] += d
        for tid, d in held(c["echo"], c["back"]).items():
            if tid in server_threads:
                who = "to client: a server thread on CPU 0 while the woken client waits"
            elif tid == client:
                who = "to client: the client itself (its wake-up and read)"
            elif tid == 0:
                who = "to client: CPU 0 idle"
            else:
                who = f"to client: {names.get(tid, tid)}"
            shares[who] += d
        shares["server: read -> echo written"] += c["echo"] - c["read"]
    print(
        f"\nslower than 3x the quiet p99 ({bound * us:.0f} µs) under attack: "
        f"{len(slow)} of {len(attacked)}, {total * 1e3:.1f} ms in all"
    )
    for who, d in sorted(shares.items(), key=lambda kv: -kv[1]):
        if total > 0 and d / total >= 0.005:
            print(f"  {100 * d / total:5.1f}%  {d * 1e3:8.2f} ms  {who}")


if __name__ == "__main__":
    main()
