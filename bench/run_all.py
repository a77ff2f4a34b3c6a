"""Run every benchmark and write one JSON report plus a markdown table (``make bench``).

Each bench runs in its own process (some start servers; all print one JSON object). The
table lists, for every figure that has a baseline measured in the same run, the figures
and the ratio(s), so a reader sees each number beside what it is compared with.

Usage: python bench/run_all.py [--quick] [--only NAME ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# quota.py includes the admin API figures of api.py
BENCHES = ["keyformat", "fs", "redis", "s3", "quota", "blocks", "store_blocks", "vllm_tier"]


def _is_ratio(key: str) -> bool:
    return "ratio" in key or "_over_" in key


def _leaves(node: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Throughput and size figures (``*per_s*``, ``bytes_per*``) of a nested result."""
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        elif (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and ("per_s" in k or "bytes_per" in k)
        ):
            yield f"{prefix}{k}", v


def rows(bench: str, node: Any, path: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(bench, case, figures, ratios) for every object holding a ratio beside its figures."""
    if isinstance(node, dict):
        ratios = {k: v for k, v in node.items() if _is_ratio(k) and isinstance(v, (int, float))}
        if isinstance(node.get("ratios"), dict):
            # {"ours": {...}, "baseline": {...}, "ratios": {...}}: figures from the siblings
            figures = {
                f"{name}.{k}": v
                for name, sub in node.items()
                if name != "ratios" and isinstance(sub, dict)
                for k, v in _leaves(sub)
            }
            yield (
                bench,
                path or "-",
                ", ".join(f"{k}={v}" for k, v in figures.items()),
                ", ".join(f"{k}={v}" for k, v in node["ratios"].items()),
            )
        if ratios:
            figures = {
                k: v
                for k, v in node.items()
                if not _is_ratio(k) and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            yield (
                bench,
                path or "-",
                ", ".join(f"{k}={v}" for k, v in figures.items()),
                ", ".join(f"{k}={v}" for k, v in ratios.items()),
            )
        for k, v in node.items():
            if isinstance(v, (dict, list)) and k != "ratios":
                yield from rows(bench, v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            label = v.get("case", i) if isinstance(v, dict) else i
            yield from rows(bench, v, f"{path}[{label}]")


def run_one(name: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--quick"] if quick else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    seconds = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        return {
            "error": f"exit {proc.returncode}",
            "stderr": proc.stderr[-2000:],
            "seconds": seconds,
        }
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": "no JSON on stdout", "stdout": proc.stdout[-2000:], "seconds": seconds}
    result["seconds"] = seconds
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter runs of every bench")
    parser.add_argument("--only", nargs="*", choices=BENCHES, help="run only these")
    parser.add_argument("--out", default="bench/out/report.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "benches": {}}
    for name in args.only or BENCHES:
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        report["benches"][name] = run_one(name, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| bench | case | figures | ratio to baseline |")
    print("|---|---|---|---|")
    failed = 0
    for name, result in report["benches"].items():
        if "error" in result:
            failed += 1
            print(f"| {name} | - | FAILED: {result['error']} | - |")
            continue
        for bench, case, figures, ratios in rows(name, result):
            print(f"| {bench} | {case} | {figures} | {ratios} |")
    print(f"\nJSON report: {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
