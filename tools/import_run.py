"""Import a run trained with IRRA's, SEN's, RDE's or TBPS-CLIP's code as a run of ours.

    python tools/import_run.py --from irra SRC_RUN_DIR --output_dir RUN
    python tools/import_run.py --from tbps checkpoint_best.pth --dataset_name RSTPReid --output_dir RUN
    python test.py --config_file RUN/configs.yaml [--root_dir DATA]       # evaluate it
    python train.py --config_file RUN/configs.yaml --init_from RUN --output_dir RUN2   # fine-tune it

SRC_RUN_DIR is the directory that code wrote (its configs.yaml and best.pth); for TBPS-CLIP, which
keeps no run config, its checkpoint file (our configs/tbps_clip/ recipe fills the rest). Every tensor is
mapped by name onto our encoder and heads; what is left out (modules we do not have, modules the
code builds but never uses) is listed; anything else stops the import with its name.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.run import read_run_config  # noqa: E402
from model.run_import import SOURCES, import_run  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.iotools import save_checkpoint, write_json  # noqa: E402
from utils.options import save_config  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="the code that wrote the run")
    parser.add_argument("src", type=Path, help="that code's run directory (configs.yaml, best.pth)")
    parser.add_argument("--output_dir", required=True, type=Path, help="our run directory to write")
    parser.add_argument("--dataset_name", default="CUHK-PEDES", help="tbps only: the dataset it was trained on")
    args = parser.parse_args(argv)
    if (args.output_dir / "best.pth").exists():
        raise UserError(f"{args.output_dir} already holds a run (best.pth); choose another --output_dir")
    cfg, state, report = import_run(args.source, args.src, args.output_dir, args.dataset_name)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, args.output_dir / "configs.yaml")
    read_run_config(args.output_dir / "configs.yaml")  # validates what was written
    save_checkpoint({"model": state, "epoch": 0, "imported_from": str(args.src.resolve())},
                    args.output_dir / "best.pth")
    write_json({"source": report.source, "source_dir": str(args.src.resolve()), "loss_names": report.loss_names,
                "tensors": report.mapped, "left_out": report.dropped, "unused_options": report.unused_options,
                "notes": report.notes}, args.output_dir / "import.json")
    print(f"{args.source} run {args.src} -> {args.output_dir}: {report.mapped} tensors, loss_names "
          f"{report.loss_names}")
    for key, why in report.dropped.items():
        print(f"  left out {key}: {why}")
    for note in report.notes:
        print(f"  note: {note}")
    if report.unused_options:
        print(f"  their options without a counterpart here: {', '.join(report.unused_options)}")
    print(f"evaluate: python test.py --config_file {args.output_dir / 'configs.yaml'}")
    return args.output_dir


if __name__ == "__main__":
    sys.exit(run_cli(main))
