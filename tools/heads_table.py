"""Print the README's heads table (Markdown) from the heads' own declarations.

    python tools/heads_table.py

One row per registered head: its ``--loss_names`` token, what it does, the method it comes from,
its config keys (with defaults) and its part in retrieval. The README's table is this output
(a test checks it), so a new head documents itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.heads import HEADS, Head  # noqa: E402


def retrieval_part(head: type[Head]) -> str:
    parts = []
    if head.query_features is not Head.query_features:
        parts.append("feature set")
    if head.rerank_score is not Head.rerank_score:
        parts.append("re-ranking")
    if head.before_epoch is not Head.before_epoch:
        parts.append("per-epoch pass")
    return ", ".join(parts) or "training only"


def heads_table() -> str:
    lines = ["| `--loss_names` token | head | method | options (default) | at evaluation |",
             "|---|---|---|---|---|"]
    for name, head in HEADS.items():
        options = ", ".join(f"`{s.key}` ({s.default})" for s in head.settings)
        lines.append(f"| `{name}` | {head.summary} | {head.method} | {options} | {retrieval_part(head)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(heads_table())
