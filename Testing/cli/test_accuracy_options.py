"""--support-order and --propagate: parsed the same way by segment, segment-cohort and evaluate
(evaluate's dest names `support_order` and `propagate` are what `--compare` sets), usage errors
exit 2, --k's help says where SAM 2.1's pointer range ends."""
from __future__ import annotations

import pytest

from RetrievalSegLib.cli.main import build_parser, main

COMMON = {
    "segment": ["segment", "img.nii.gz", "--bank", "b", "--out", "o.nii.gz"],
    "segment-cohort": ["segment-cohort", "c.csv", "--bank", "b", "--out", "o"],
    "evaluate": ["evaluate", "--test", "t", "--labels", "1:A", "--out", "o"],
}


@pytest.mark.parametrize("command", sorted(COMMON))
def test_defaults_and_values(command):
    p = build_parser()
    args = p.parse_args(COMMON[command])
    assert args.support_order == "nearest" and args.propagate == 0
    args = p.parse_args(COMMON[command] + ["--support-order", "farthest", "--propagate", "6"])
    assert args.support_order == "farthest" and args.propagate == 6


@pytest.mark.parametrize("bad", [["--propagate", "7"], ["--propagate", "-1"], ["--propagate", "x"],
                                 ["--support-order", "best"]])
def test_bad_values_are_usage_errors(bad, capsys):
    assert main(COMMON["segment"] + bad) == 2


def test_k_help_names_the_pointer_range(capsys):
    assert main(["segment", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "k > 15" in out and "max_obj_ptrs_in_encoder 16" in out
    assert "--support-order" in out and "--propagate" in out
