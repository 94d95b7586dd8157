"""Print a table in the papers' format from run directories; runs that differ only in their seed
are one row: mean +- sample standard deviation over the n seeds.

    python tools/collect_results.py logs/CUHK-PEDES [--task t2i] [--at last] [--format csv]

Arguments are run directories (``configs.yaml`` and ``results.json``, written by train.py) or folders
searched for them at any depth. A run without ``results.json`` (still training, interrupted or
failed) is named on stderr and left out; no finished run at all is an error. ``--at
selected`` (default) reports the test metrics at the selected checkpoint, ``--at last`` those at the
last epoch. The method column is the run's ``name``, or its ``loss_names`` when the name is empty.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METRICS = ("R1", "R5", "R10", "mAP", "mINP")
# keys that say where or how a run was executed, not what was trained
BOOKKEEPING = {"seed", "output_dir", "resume", "resume_ckpt_file", "overwrite", "num_workers", "device",
               "config_file"}


@dataclass
class Group:
    method: str
    dataset: str
    config: dict
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})


def read_run(run_dir: Path, task: str, at: str) -> tuple[dict, dict[str, float]]:
    """(config, metrics of ``task``) of one run."""
    for name in ("results.json", "configs.yaml"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found")
    results = json.loads((run_dir / "results.json").read_text())
    cfg = yaml.safe_load((run_dir / "configs.yaml").read_text()) or {}
    if at == "last":
        if "last" not in results:
            raise ValueError(f"{run_dir / 'results.json'} has no 'last' block (written by an older version)")
        results = results["last"]
    if task not in results:
        blocks = [k for k, v in results.items() if isinstance(v, dict) and "R1" in v]
        raise ValueError(f"{run_dir / 'results.json'} has no '{task}' block (has: {', '.join(blocks)})")
    return cfg, results[task]


def find_runs(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(finished runs, unfinished runs) among ``paths`` and the run directories below them, in order."""
    finished: list[Path] = []
    unfinished: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        runs = [path] if (path / "configs.yaml").is_file() else sorted(p.parent for p in path.rglob("configs.yaml"))
        if not runs:
            raise FileNotFoundError(f"no run directory (with configs.yaml) in {path}")
        for run in runs:
            (finished if (run / "results.json").is_file() else unfinished).append(run)
    return finished, unfinished


def group_runs(run_dirs: list[Path], task: str, at: str) -> list[Group]:
    """Runs grouped by their config without the seed and the bookkeeping keys, in first-seen order."""
    groups: dict[str, Group] = {}
    for run_dir in run_dirs:
        cfg, metrics = read_run(run_dir, task, at)
        config = {k: v for k, v in cfg.items() if k not in BOOKKEEPING}
        key = json.dumps(config, sort_keys=True, default=str)
        group = groups.setdefault(key, Group(cfg.get("name") or cfg.get("loss_names", "?"),
                                             cfg.get("dataset_name", "?"), config))
        group.seeds.append(cfg.get("seed"))
        for metric in METRICS:
            group.values[metric].append(float(metrics[metric]))
    label_differences(list(groups.values()))
    return list(groups.values())


def label_differences(groups: list[Group], shown: int = 3) -> None:
    """Groups that share a method and dataset get the config values that tell them apart in the method
    cell, e.g. ``demo (lr=0.001)``: each key whose value varies, unless the group holds the value most
    groups hold."""
    clusters: dict[tuple[str, str], list[Group]] = {}
    for group in groups:
        clusters.setdefault((group.method, group.dataset), []).append(group)
    for cluster in (c for c in clusters.values() if len(c) > 1):
        flat = [flatten(g.config) for g in cluster]
        labels: list[list[str]] = [[] for _ in cluster]
        for key in sorted({k for f in flat for k in f}):
            values = [json.dumps(f.get(key), sort_keys=True, default=str) for f in flat]
            common, count = Counter(values).most_common(1)[0]
            if count == len(values):
                continue
            for label, f, value in zip(labels, flat, values):
                if value != common or 2 * count <= len(values):
                    label.append(f"{key}={f.get(key)}")
        for group, label in zip(cluster, labels):
            if label:
                group.method += " (" + ", ".join(label[:shown]) + (", ..." if len(label) > shown else "") + ")"


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config blocks as dotted keys: ``{"clip": {"vision_width": 64}}`` -> ``clip.vision_width``."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(groups: list[Group]) -> str:
    header = ["method", "dataset", "n", *METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([g.method, g.dataset, str(len(g.seeds))] + [cell(g.values[m]) for m in METRICS])
              + " |" for g in groups]
    return "\n".join(lines)


def csv_table(groups: list[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "dataset", "n", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")])
    for g in groups:
        row = [g.method, g.dataset, len(g.seeds), " ".join(map(str, g.seeds))]
        for m in METRICS:
            values = g.values[m]
            row += [f"{statistics.mean(values):.4f}", f"{statistics.stdev(values):.4f}" if len(values) > 1 else ""]
        writer.writerow(row)
    return out.getvalue().rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--task", default="t2i", help="results block: t2i, i2t, t2i_rerank, ...")
    parser.add_argument("--at", choices=("selected", "last"), default="selected",
                        help="test metrics at the selected checkpoint or at the last epoch")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    args = parser.parse_args(argv)
    try:
        finished, unfinished = find_runs(args.run_dirs)
        for run in unfinished:
            print(f"skipped {run}: no results.json (still training, interrupted or failed)", file=sys.stderr)
        if not finished:
            raise FileNotFoundError("no finished run (with results.json) among the arguments")
        groups = group_runs(finished, args.task, args.at)
    except (OSError, ValueError, KeyError, yaml.YAMLError) as err:  # JSONDecodeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown_table(groups) if args.format == "markdown" else csv_table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
