"""Print a Markdown table in the papers' format from run directories.

    python tools/collect_results.py logs/CUHK-PEDES/*_irra logs/RSTPReid/*_irra [--task t2i]

Each run directory needs ``results.json`` and ``configs.yaml`` (written by train.py / test.py).
The method column is the run's ``name``, or its ``loss_names`` when the name is empty.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def result_row(run_dir: Path, task: str) -> list[str]:
    for name in ("results.json", "configs.yaml"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found")
    results = json.loads((run_dir / "results.json").read_text())
    cfg = yaml.safe_load((run_dir / "configs.yaml").read_text()) or {}
    if task not in results:
        raise ValueError(f"{run_dir / 'results.json'} has no '{task}' block (has: {', '.join(results)})")
    method = cfg.get("name") or cfg.get("loss_names", "?")
    return [method, cfg.get("dataset_name", "?")] + [f"{results[task][m]:.2f}" for m in METRICS]


def markdown_table(rows: list[list[str]]) -> str:
    header = ["method", "dataset", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--task", default="t2i", help="results block: t2i, i2t, t2i_rerank")
    args = parser.parse_args(argv)
    try:
        rows = [result_row(run_dir, args.task) for run_dir in args.run_dirs]
    except (OSError, ValueError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
