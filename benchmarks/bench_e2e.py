"""Benchmark 5: CPU end to end, wall time of ``prism run`` on the embedded model, per stage.

Runs (once) ``prism run --preset tiny --domains "writing,coding,safety" --out RUN`` in a subprocess and
summarises the run directory it leaves:

- total wall time of the command;
- per stage: the seconds the run reports itself (``stage_seconds`` of ``RUN/training_report.json``, or
  any ``seconds`` / ``elapsed_s`` / ``wall_s`` / ``timings`` field in ``RUN/<stage>.done.json`` or another
  ``RUN/**/*report*.json``), else from file times: from the later of the stage's ``<stage>.meta.json``
  and the previous stage's ``.done.json`` to its own ``.done.json``;
- records per stage (lines of ``<stage>.jsonl``).

This takes ~10 minutes of a 2-core CPU: run it once. ``--summarise RUN`` only reads an existing run
directory; ``--command`` replaces the command (tests use a toy one).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECONDS_KEYS = ("seconds", "elapsed_s", "wall_s", "duration_s", "time_s")


def prism_command(out: str, domains: str, preset: str, model: Optional[str], extra: str) -> list[str]:
    """The ``prism run`` command line (via ``python -m prism_persona.cli`` when no ``prism`` is on PATH)."""
    cmd = [
        sys.executable,
        "-c",
        "from prism_persona.cli import main; raise SystemExit(main())",
        "run",
        "--preset",
        preset,
        "--domains",
        domains,
        "--out",
        out,
    ]
    if model:
        cmd += ["--model", model]
    return cmd + shlex.split(extra)


def run_command(cmd: list[str] | str, timeout: Optional[float] = None) -> dict:
    """Run the command; wall seconds, exit code and the tail of its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-2000:]
    return {"wall_s": wall, "returncode": proc.returncode, "output_tail": tail}


def _seconds_in(obj: Any) -> dict:
    """Stage -> seconds found in a JSON object: ``{"timings": {stage: s}}`` or a top-level seconds field."""
    found: dict = {}
    if not isinstance(obj, dict):
        return found
    timings = obj.get("timings") or obj.get("stage_seconds") or obj.get("stages")
    if isinstance(timings, dict):
        for k, v in timings.items():
            if isinstance(v, (int, float)):
                found[str(k)] = float(v)
            elif isinstance(v, dict):
                for key in SECONDS_KEYS:
                    if isinstance(v.get(key), (int, float)):
                        found[str(k)] = float(v[key])
                        break
    return found


def _own_seconds(obj: Any) -> Optional[float]:
    if isinstance(obj, dict):
        for key in SECONDS_KEYS:
            if isinstance(obj.get(key), (int, float)):
                return float(obj[key])
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _stage_times(run: Path) -> dict:
    """stage -> {"start", "end", "how"} from file times.

    A stage ends at its ``.done.json``, or, for stages that write no done marker, at the last record
    appended to its ``.jsonl`` ("last record": a lower bound while the run is still going). Stores may
    all be opened (``.meta.json``) at the start of a run, so a stage starts at the later of its meta
    file and the previous stage's end: consecutive spans that add up to the run's wall time.
    """
    metas = {m.name[: -len(".meta.json")]: m.stat().st_mtime for m in run.glob("*.meta.json")}
    ends: dict = {}
    for jl in run.glob("*.jsonl"):
        ends[jl.name[: -len(".jsonl")]] = (jl.stat().st_mtime, "file times (last record)")
    for d in run.glob("*.done.json"):
        ends[d.name[: -len(".done.json")]] = (d.stat().st_mtime, "file times")
    cfg = run / "config.json"
    firsts = list(metas.values()) + [e for e, _ in ends.values()]
    t = cfg.stat().st_mtime if cfg.exists() else min(firsts, default=0.0)
    out: dict = {}
    for stage, (end, how) in sorted(ends.items(), key=lambda kv: kv[1][0]):
        out[stage] = {"start": max(metas.get(stage, t), t), "end": end, "how": how}
        t = end
    for stage, start in metas.items():
        out.setdefault(stage, {"start": start, "end": None, "how": "unfinished"})
    return out


def summarise_run(run: str | Path) -> list[dict]:
    """One row per stage: seconds (reported, else from file times), how measured, records."""
    run = Path(run)
    reported: dict = {}
    for rep in sorted(run.rglob("*report*.json")) + sorted(run.rglob("timings*.json")):
        reported.update(_seconds_in(_read_json(rep)))
    own: dict = {}
    for done in sorted(run.glob("*.done.json")):
        info = _read_json(done)
        own[done.name[: -len(".done.json")]] = _own_seconds(info)
        reported.update(_seconds_in(info))
    times = _stage_times(run)
    stages = list(times) + [s for s in reported if s not in times]
    rows = []
    for stage in stages:
        span = times.get(stage, {"start": None, "end": None, "how": "unfinished"})
        jl = run / f"{stage}.jsonl"
        records = sum(1 for line in jl.open(encoding="utf-8") if line.strip()) if jl.exists() else None
        if stage in reported:
            sec, how = reported[stage], "reported"
        elif own.get(stage) is not None:
            sec, how = own[stage], "reported"
        elif span["end"] is not None:
            sec, how = span["end"] - span["start"], span["how"]
        else:
            sec, how = None, "unfinished"
        rows.append(
            {
                "stage": stage,
                "seconds": sec,
                "measured_by": how,
                "records": records,
                "_order": span["end"] if span["end"] is not None else float("inf"),
            }
        )
    rows.sort(key=lambda r: r.pop("_order"))
    return rows


def main(argv: Optional[list] = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", default="writing,coding,safety")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--model", default=None, help="model for prism run (default: the embedded SmolLM2-135M)")
    p.add_argument("--run-dir", default="", help="where the run goes (default: a fresh temporary directory)")
    p.add_argument("--extra", default="", help="more arguments for prism run, e.g. '--quiet'")
    p.add_argument("--command", default="", help="run this shell command instead of prism run ({out} = run dir)")
    p.add_argument("--summarise", default="", help="only summarise this existing run directory")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", default=str(common.RESULTS), help="results file to append to ('' = do not record)")
    args = p.parse_args(argv)
    result: dict = {}
    if args.summarise:
        run = Path(args.summarise)
    else:
        run = Path(args.run_dir or tempfile.mkdtemp(prefix="prism-e2e-")) / "run"
        cmd = (
            args.command.replace("{out}", str(run))
            if args.command
            else prism_command(str(run), args.domains, args.preset, args.model, args.extra)
        )
        print(f"running: {cmd if isinstance(cmd, str) else shlex.join(cmd)}")
        sys.stdout.flush()
        result = run_command(cmd, timeout=args.timeout)
        if result["returncode"] != 0:
            print(f"command failed (exit {result['returncode']}):\n{result['output_tail']}")
    stages = summarise_run(run) if run.exists() else []
    total = result.get("wall_s")
    for r in stages:
        if total and isinstance(r["seconds"], (int, float)):
            r["share_of_total"] = r["seconds"] / total
    print(f"# End to end: {args.command or 'prism run'} ({args.preset}, domains {args.domains})")
    print(
        f"run dir: {run}\ntotal wall: {common.fmt(total) if total else 'n/a'} s "
        "(stages can nest: bootstrap holds personas/queries/answers/verdicts)"
    )
    print(common.table(stages, ["stage", "seconds", "share_of_total", "records", "measured_by"]))
    settings = {
        "preset": args.preset,
        "domains": args.domains,
        "model": args.model or "embedded",
        "command": args.command or "prism run",
        "run_dir": str(run),
    }
    rows = [{"stage": "TOTAL", "seconds": total, "returncode": result.get("returncode")}] + stages
    common.record(args.out, "e2e", settings, rows)
    return {
        "total_s": total,
        "returncode": result.get("returncode"),
        "stages": stages,
        "output_tail": result.get("output_tail", ""),
    }


if __name__ == "__main__":
    main()
