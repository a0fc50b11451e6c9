"""zbroker benchmarks: each workload runs zbroker next to a reference in one session.

    python3 dev.py bench                 every workload, full size, 3 runs per system
    python3 dev.py bench --quick         smaller counts, for a smoke test
    python3 dev.py bench --only mdp --runs 5 --json /tmp/mdp.json

Results go to bench/results/<workload>.json (the latest run) and, kept for the record,
bench/results/runs/<date>-<workload>-<commit>.json (or all to one file given with
--json); a markdown table for docs/performance.md is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import auth
import compare
import durable
import fuzz
import mdp
import postgres
import scheduling
import streams
import web
from harness import (
    RESULTS_DIR,
    RUNS_DIR,
    BenchError,
    JSONDict,
    Options,
    Workload,
    machine_info,
    machine_line,
    progress,
    run_file_name,
    sigterm_as_exit,
)

# Add a workload by writing a module with a WORKLOAD and listing it here.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        mdp.WORKLOAD,
        durable.WORKLOAD,
        compare.WORKLOAD,
        fuzz.WORKLOAD,
        auth.WORKLOAD,
        streams.WORKLOAD,
        scheduling.WORKLOAD,
        web.WORKLOAD,
        postgres.WORKLOAD,
    )
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dev.py bench",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads:\n"
        + "\n".join(f"  {w.name:<10} {w.summary}" for w in WORKLOADS.values()),
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke test)")
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        metavar="N",
        help="runs per system (default: 3, or 1 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(WORKLOADS),
        metavar="NAME",
        help="run only this workload (repeatable)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write all results to PATH (default: bench/results/<workload>.json, "
        "and a copy in bench/results/runs/ named by date, workload and commit)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        metavar="DIR",
        help="keep the processes' logs in DIR (default: a temporary directory)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample the zbroker process with py-spy during throughput phases and keep the "
        "collapsed stacks in DIR (perturbs the figures of those runs)",
    )
    parser.add_argument(
        "--messages",
        type=int,
        metavar="N",
        help="fuzz: messages to send (default 1,000,000; 50,000 with --quick)",
    )
    parser.add_argument("--seed", type=int, metavar="S", help="fuzz: the seed (default 1)")
    args = parser.parse_args(argv)
    if args.messages is not None and args.messages < 1:
        parser.error("--messages must be at least 1")
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def document(machine: JSONDict, quick: bool, results: dict[str, JSONDict]) -> JSONDict:
    return {"schema": 1, "machine": machine, "quick": quick, "workloads": results}


def write_json(path: Path, doc: JSONDict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    print(f"[bench] wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    WORKLOADS["fuzz"] = fuzz.workload(args.messages, args.seed)
    selected = [WORKLOADS[name] for name in (args.only or WORKLOADS)]
    machine = machine_info()
    load = machine["load_average_1m_at_start"]
    print(f"[bench] {machine_line(machine)}; load average {load}", flush=True)
    results: dict[str, JSONDict] = {}
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="zbroker-bench-") as tmp:
        log_dir = args.logs or Path(tmp)
        options = Options(args.quick, args.runs, log_dir, profile_dir=args.profile)
        for workload in selected:
            try:
                results[workload.name] = workload.run(options, progress(workload.name))
            except BenchError as exc:
                print(f"[{workload.name}] FAILED: {exc}", file=sys.stderr, flush=True)
                return 1
            except KeyboardInterrupt:
                print(f"\n[{workload.name}] interrupted; all processes stopped", flush=True)
                return 130
            if args.json is None:
                doc = document(machine, args.quick, {workload.name: results[workload.name]})
                write_json(RESULTS_DIR / f"{workload.name}.json", doc)
                write_json(RUNS_DIR / run_file_name(machine, workload.name, args.quick), doc)
    if args.json is not None:
        write_json(args.json, document(machine, args.quick, results))
    for name, result in results.items():
        print(f"\n### {name}\n\n{WORKLOADS[name].markdown(result)}")
    print(f"\nMachine: {machine_line(machine)}.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
