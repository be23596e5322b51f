"""The phase table of one activation (CPU ms), from the output of bench/bench_activation.py --probe.

    .venv/bin/python bench/bench_activation.py --agents 100 --trees base=REV,new=REV \\
        --probe 1 --runs 3 > out.log
    .venv/bin/python bench/activation_phases.py out.log 100 base,new

Groups the probe's phase paths into the phases of issue 11 (TUF, download, check,
load, state, messages, threads) and prints one markdown table per model: the median
over the runs of the probed agent of each tree. A probed agent pays for its timers
(10-35 % more than the fleet's mean): compare trees, not absolute figures.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable

Run = dict[str, float]

CHILD_TOTAL = (
    "child:(check process CPU for this check, process_time)",
    "child:(child process CPU from fork to verdict, process_time)",
)
# a forked child's phases are nested under the agent's; a long-lived check process's are not
CHILD = (
    "child:refresh > consider > check_isolated > child_check > load_checked",
    "child:child_check > load_checked",
)
CONSIDER = "refresh > consider"
DOWNLOAD = "refresh > fetch_release > chunk_download"


def child(d: Run, sub: str) -> float:
    return sum(d.get(f"{prefix}{sub}", 0.0) for prefix in CHILD)


def g(d: Run, *keys: str) -> float:
    return sum(d.get(k, 0.0) for k in keys)


def messages(d: Run) -> float:
    """State and event publishing on the main thread (not nested in another counted row)."""
    return sum(
        v
        for k, v in d.items()
        if not k.startswith(("child:", "paho", "thread:"))
        and k.endswith(("> publish_state", "> event"))
        and k.count(">") in (1, 2)
    )


def check_rest(d: Run) -> float:
    parts = (" > load_interpreter", " > check_golden", " > card_sha256")
    return g(d, *CHILD_TOTAL) - sum(child(d, p) for p in parts)


ROWS: list[tuple[str, Callable[[Run], float]]] = [
    ("TUF refresh (python-tuf: parse, canonical JSON, signatures)", lambda d: g(d, "refresh > tuf_refresh")),
    ("download: chunk loop (queue, chunk hashes, pwrite, (un)subscribe, progress)", lambda d: g(d, DOWNLOAD)),
    ("  of which pwrite of the chunks", lambda d: g(d, f"{DOWNLOAD} > fetch_missing > os.pwrite")),
    ("  of which fsync of the downloads", lambda d: g(d, f"{DOWNLOAD} > os.fsync")),
    ("download: whole-file hash read back", lambda d: g(d, "refresh > fetch_release > target_hash_verify")),
    ("download: install (renames, 2 dir fsyncs)", lambda d: g(d, "refresh > fetch_release > store_install")),
    (
        "check: agent side (fork, pipe, wait; or a request to the check process)",
        lambda d: (
            g(d, CONSIDER)
            - g(
                d,
                *(
                    f"{CONSIDER} > {p}"
                    for p in (
                        "parent_load_and_check",
                        "load_unchecked",
                        "state_file_save",
                        "event",
                        "registry_swap",
                    )
                ),
            )
        ),
    ),
    ("check process: CPU for this check", lambda d: g(d, *CHILD_TOTAL)),
    ("  interpreter + XNNPACK delegate (load, allocate)", lambda d: child(d, " > load_interpreter")),
    ("  golden vectors (np.load + 8 invokes)", lambda d: child(d, " > check_golden")),
    ("    of which invoke", lambda d: child(d, " > check_golden > invoke")),
    ("  card: SHA-256 of the model", lambda d: child(d, " > card_sha256")),
    ("  rest: the fork's page faults, Python, the runner", check_rest),
    (
        "agent: load for serving (and before: the second check)",
        lambda d: g(d, f"{CONSIDER} > parent_load_and_check", f"{CONSIDER} > load_unchecked"),
    ),
    (
        "  of which the second golden check and card hash",
        lambda d: g(
            d,
            f"{CONSIDER} > parent_load_and_check > load_checked > check_golden",
            f"{CONSIDER} > parent_load_and_check > load_checked > card_sha256",
        ),
    ),
    ("state file writes (JSON, 2 fsyncs)", lambda d: g(d, f"{CONSIDER} > state_file_save")),
    ("state and event messages on the main thread", messages),
    ("will renewal (main thread: disconnect, connect)", lambda d: g(d, "after_changes > will_renewal")),
    (
        "cleanup of old versions, malloc_trim, choose",
        lambda d: g(d, "refresh > cleanup", "malloc_trim", "refresh > choose", "refresh > prune_downloads"),
    ),
    ("main thread total", lambda d: g(d, "thread:MainThread")),
    (
        "MQTT network thread (paho: packets, messages, acks, reconnect)",
        lambda d: g(d, "own") - g(d, "thread:MainThread", "thread:metrics-sender", "thread:mqtt-infer"),
    ),
    ("metrics-sender thread (polls its queue every second)", lambda d: g(d, "thread:metrics-sender")),
    ("**total (agent process + check process)**", lambda d: g(d, "total")),
]

_HEAD = re.compile(r"#### probe: N=(\d+) (\w+) v\d+ tree (\S+)")
_TOTALS = re.compile(r"process CPU .*precise: own ([\d.]+) .*= ([\d.]+) ms; live threads: (.*)")
_ROW = re.compile(r"\| (child: )?(.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|")


def parse(path: str) -> dict[tuple[int, str, str], list[Run]]:
    out: dict[tuple[int, str, str], list[Run]] = defaultdict(list)
    cur: Run | None = None
    with open(path) as f:
        for line in f:
            if m := _HEAD.match(line):
                cur = {}
                out[(int(m[1]), m[2], m[3])].append(cur)
            elif cur is None:
                continue
            elif m := _TOTALS.match(line):
                cur["own"], cur["total"] = float(m[1]), float(m[2])
                for part in m[3].split(", "):
                    name, _, value = part.rpartition(" ")
                    key = "thread:" + ("paho" if name.startswith("paho") else name)
                    cur[key] = cur.get(key, 0.0) + float(value)
            elif m := _ROW.match(line):
                cur[("child:" if m[1] else "") + m[2]] = float(m[4])
            elif line.startswith("N="):
                cur = None
    return out


def table(data: dict[tuple[int, str, str], list[Run]], n: int, model: str, trees: list[str]) -> None:
    cols = [(t, data.get((n, model, t), [])) for t in trees]
    print(
        f"\n{model}, N={n}: CPU ms of one activation, median over runs ("
        + ", ".join(f"{t}: {len(runs)}" for t, runs in cols)
        + " runs)\n"
    )
    print("| phase | " + " | ".join(trees) + " |")
    print("| --- | " + " | ".join("---:" for _ in trees) + " |")
    for label, fn in ROWS:
        cells = [f"{statistics.median(fn(d) for d in runs):.1f}" if runs else "-" for _, runs in cols]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].isdigit():
        # -h, --help, or too few arguments: the usage, not a traceback
        sys.stdout.write((__doc__ or "") + "\nusage: activation_phases.py LOG N TREE[,TREE...]\n")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    path, n, trees = argv[0], int(argv[1]), argv[2].split(",")
    data = parse(path)
    for model in sorted({m for (k, m, _) in data if k == n}):
        table(data, n, model, trees)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
