"""`rseg sample-data DIR`: a small synthetic cardiac study (NIfTI images and label maps, train/ and
test/ as images/ + labels/) to try the commands on, with the commands printed; nothing downloaded."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_sample_data(args: argparse.Namespace) -> int:
    """`rseg sample-data DIR`: a small synthetic cardiac study to try the commands on (no download)."""
    from ..data.synthetic import LABELS, make_synthetic_study
    from ..data.volume import write_volume

    out = Path(args.dir)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        print(f"rseg sample-data: error: {out} exists and is not an empty folder; give a new folder "
              "(nothing is written over)", file=sys.stderr)
        return 2
    cases = make_synthetic_study(args.cases + 1, shape=(8, 64, 64), spacing=(1.25, 1.25, 8.0), seed=args.seed)
    for c, split in zip(cases, ["train"] * args.cases + ["test"]):
        for sub, vol in (("images", c.image), ("labels", c.labels)):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
            write_volume(vol, out / split / sub / f"{c.case_id}.nii.gz")
    labels = ",".join(f"{v}:{name}" for v, (name, _) in LABELS.items())
    first, test = cases[0].case_id, cases[-1].case_id
    print(f"wrote a synthetic study to {out}: {args.cases} training case(s) in train/, 1 test case in test/ "
          f"(images/ + labels/, NIfTI; labels {labels}). Try:\n"
          f"  rseg bank create {out}/bank --labels {labels}\n"
          f"  rseg bank add {out}/bank {out}/train/images/{first}.nii.gz {out}/train/labels/{first}.nii.gz "
          f"--case {first}\n"
          f"  rseg segment {out}/test/images/{test}.nii.gz --bank {out}/bank --out {out}/seg.nii.gz "
          "--image-size 512\n"
          f"  rseg evaluate --train {out}/train --test {out}/test --labels {labels} --out {out}/eval --image-size 512")
    return 0


def add_sample_data_parser(sub) -> None:
    """The `rseg sample-data` subcommand."""
    p = sub.add_parser("sample-data", help="write a small synthetic study to try the commands on",
                       description="Write a small synthetic cardiac study (NIfTI images and label maps, "
                                   "train/ and test/ as images/ + labels/) into DIR, a new or empty folder, "
                                   "and print the commands to try on it. Nothing is downloaded.")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--cases", type=int, default=2, choices=range(1, 11), metavar="N",
                   help="training cases (1-10, default 2); one test case besides")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic shapes (default 0)")
    p.set_defaults(func=cmd_sample_data)
