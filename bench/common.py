"""What every benchmark shares: the machine and versions it ran on, and one result-file format.

A result file (``bench/results/NAME.json``) holds ``{"benchmark", "command", "data", "machine", "versions",
"date", "results"}``: enough for a reader to know what produced each number and to rerun it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from vitq.compare import cpu_info  # noqa: F401  (re-exported: the machine a result ran on)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"
DEV650 = SHARED / "imagenet-val-dev650"
SAMPLE1000 = SHARED / "imagenet-sample-eli1000"


def versions() -> dict[str, str]:
    """Versions of the packages a benchmark's numbers depend on (those importable here)."""
    out = {"python": platform.python_version()}
    for mod in ("vitq", "numpy", "onnx", "onnxruntime", "torch", "timm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed (a runtime-only venv has no torch)
            continue
    return out


def write_result(name: str, results: Any, *, data: str, argv: list[str] | None = None,
                 out: Path | None = None, merged: bool = False) -> Path:
    """Write ``bench/results/NAME.json`` (or ``out``) atomically and return its path.

    ``merged``: ``results`` keeps rows of the file's earlier runs, so ``runs`` lists every command (with its date)
    whose rows the file holds, not only the last one.
    """
    argv = sys.argv[1:] if argv is None else argv
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    command = " ".join(["python -m bench", name, *argv])
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    runs = [{"command": command, "date": date}]
    if merged and path.is_file():
        prev = json.loads(path.read_text())
        earlier = prev.get("runs") or [{"command": prev.get("command"), "date": prev.get("date")}]
        runs = [r for r in earlier if r.get("command") != command] + runs
    payload = {"benchmark": name, "command": command, "data": data, "machine": cpu_info(), "versions": versions(),
               "date": date, "runs": runs, "results": results}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def stamp_cpu(kept: list[dict], prev: dict[str, Any], new: list[dict]) -> list[dict]:
    """``kept + new`` with each row naming the CPU it ran on (``cpu``: flags_str): rows merged from an earlier run
    keep that run's machine, so a result file that holds several runs never credits one CPU with another's times."""
    if prev.get("machine"):
        for r in kept:
            r.setdefault("cpu", flags_str(prev["machine"]))
    here = flags_str(cpu_info())
    for r in new:
        r["cpu"] = here
    return kept + new


def read_result(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def flags_str(machine: dict[str, Any]) -> str:
    """'AMD EPYC, 2 cores, avx2 fma' for tables."""
    return f"{machine['model']}, {machine['cores']} cores, {' '.join(machine['flags']) or 'no int8 ISA flags'}"


def busy() -> tuple[float, float, float]:
    """(wall s, machine-wide busy CPU s from /proc/stat, this process' and its children's CPU s)."""
    import resource

    ticks = os.sysconf("SC_CLK_TCK")
    f = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    machine = (sum(f) - f[3] - f[4]) / ticks  # all but idle and iowait
    own = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for k in ("ru_utime", "ru_stime"))
    return time.perf_counter(), machine, own


def others_share(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Share of the machine's CPU capacity that other processes used between two :func:`busy` readings."""
    wall = max(b[0] - a[0], 1e-9)
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (wall * (os.cpu_count() or 1)))
