"""What a cohort output is made of: every `segment-cohort` option that changes a volume's result is
part of the identity a resume compares (issue 31, class 2), and a bank changed during the run is
refused whatever changed.

The option list is read from the parser itself, so an option added later is covered without
editing this file: it is either given a different value here (a flag is flipped, a choice changed)
and must then change `expected_provenance`, or it must be named in `NOT_AN_IDENTITY` with the
reason it cannot change an output. An option that is neither fails `test_every_option_is_classified`.
"""
from __future__ import annotations

import argparse
import warnings

import pytest

from RetrievalSegLib.cli.cohort import cohort_settings
from RetrievalSegLib.cli.common import _window
from RetrievalSegLib.cli.main import build_parser
from RetrievalSegLib.cohort.volume_job import expected_provenance

BASE = ["segment-cohort", "manifest.csv", "--bank", "bank", "--out", "out",
        "--random-weights", "--image-size", "256", "--dinov2-input-size", "56", "--device", "cpu"]

#: Options that cannot change a volume's label map, each with the reason. Anything else must.
NOT_AN_IDENTITY = {
    "help": "prints the help",
    "manifest": "which volumes: each output is judged on its own",
    "bank": "the bank is identified by its id and revision (in the identity), not its path",
    "out": "where outputs go: another folder has its own outputs",
    "format": "the file ending names another output file (a new file, judged on its own)",
    "workers": "how many processes: the same code on the same volume",
    "threads": "torch threads: last-bit float differences only, documented in --help",
    "shard": "which volumes this task takes",
    "ray": "where the workers run",
    "cache_dir": "where memories are cached: a memory is keyed by bank id and SAM 2 identity",
    "cache_gb": "cache cap: an evicted memory is recomputed identically (test_cache_eviction_keeps_results_identical)",
    "report": "an extra HTML page, not the label map",
    "json": "how the summary is printed",
    "no_progress": "stderr only",
    "device": "CPU or which GPU: last-bit float differences only, as --threads (one run spreads over cuda:0..N)",
    "batch_size": "queries per batch: the batched path equals the per-slice path "
                  "(test_batched_fp32_equals_per_slice_fp32)",
    "batch": "slices per image-encoder call: the same encoder features",
    "compile": "torch.compile of the same model: the same computation",
    "random_weights": "in the identity (the model identities say random-seedN), but the other value needs "
                      "weight files this test does not have",
    "sam2_checkpoint": "the weights' SHA-256 is the model identity (models/loaders.py); unused with --random-weights",
    "dinov2_path": "the weights' SHA-256 is the model identity (models/loaders.py); unused with --random-weights",
    "worker": "where the models run: a worker over ssh gives the local run's output bit for bit "
              "(test_cohort_remote.py), and its sidecar has the same identity",
    "worker_python": "the command that starts that worker on its host",
}

#: A different value for options whose type the test cannot guess: (arguments of the base run, of the other run).
ALTERNATIVES = {
    "sam2": ([], ["--sam2", "sam2.1-small"]),
    "dinov2": ([], ["--dinov2", "base"]),
    "image_size": ([], ["--image-size", "512"]),
    "dinov2_input_size": ([], ["--dinov2-input-size", "112"]),
    "fill_hole_area": ([], ["--fill-hole-area", "3"]),
    "seed": ([], ["--seed", "1"]),
    "precision": ([], ["--precision", "bf16"]),  # the default, auto, is fp32 on this CPU
    "k": ([], ["--k", "3"]),
    "axis": ([], ["--axis", "i"]),
    "labels": ([], ["--labels", "1"]),
    "slices": ([], ["--slices", "0:1"]),
    "extent_stop": ([], ["--extent-stop", "0"]),
    "propagate": ([], ["--propagate", "2"]),
    "presence_threshold": ([], ["--presence-threshold", "0.5"]),
    "window": ([], ["--window", "400", "--level", "40"]),
    "level": (["--window", "400", "--level", "40"], ["--window", "400", "--level", "50"]),
}


def _cohort_actions() -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["segment-cohort"]._actions}


ACTIONS = _cohort_actions()


def _alternative(dest: str) -> tuple[list[str], list[str]]:
    """Base and changed arguments for `dest`: from the table, else derived from the option's kind."""
    if dest in ALTERNATIVES:
        return ALTERNATIVES[dest]
    action = ACTIONS[dest]
    flag = action.option_strings[-1] if action.option_strings else None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [], [flag]
    if flag and action.choices:
        other = next((c for c in action.choices if c != action.default), None)
        if other is not None:
            return [], [flag, str(other)]
    pytest.fail(f"segment-cohort option {flag or dest} is new: give it another value in ALTERNATIVES (and make it "
                f"part of the cohort identity, cohort.volume_job.COHORT_OPTIONS or the model identity), or name it "
                f"in NOT_AN_IDENTITY with the reason it cannot change an output")


class _Bank:
    """What `cohort_settings` reads of an opened bank."""

    bank_id = "0123abcd"
    revision = 7


_engines: dict[tuple, object] = {}


def _provenance(extra: list[str]) -> dict:
    """`expected_provenance` of a parsed command line, with the engine its model options make."""
    from RetrievalSegLib.engine.build import make_engine
    from RetrievalSegLib.engine.sam2_memory import resolve_precision

    args = build_parser().parse_args([*BASE, *extra])
    settings, model_args = cohort_settings(args, _Bank(), _window(args))
    key = tuple(sorted((k, repr(v)) for k, v in model_args.items()))
    if key not in _engines:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _engines[key] = make_engine(argparse.Namespace(**model_args))
    engine = _engines[key]
    precision = resolve_precision(settings.options.get("precision", "auto"), engine.sam.device)
    return expected_provenance(engine, settings, precision)


def test_every_option_is_classified() -> None:
    """A new option must either change the identity (it gets a value below) or say why it cannot."""
    for dest in ACTIONS:
        if dest not in NOT_AN_IDENTITY:
            _alternative(dest)  # fails with what to do for an option it cannot give another value
    stale = sorted(set(NOT_AN_IDENTITY) - set(ACTIONS))
    assert not stale, f"NOT_AN_IDENTITY names options segment-cohort no longer has: {stale}"


@pytest.mark.parametrize("dest", sorted(d for d in ACTIONS if d not in NOT_AN_IDENTITY))
def test_an_output_made_with_another_value_of_any_option_is_redone(dest: str) -> None:
    """Changing one option changes what the sidecar must say, so the old output is not skipped."""
    base, changed = _alternative(dest)
    assert build_parser().parse_args([*BASE, *base]) != build_parser().parse_args([*BASE, *changed])
    before, after = _provenance(base), _provenance(changed)
    assert before != after, f"--{dest.replace('_', '-')} changes the output but not the cohort identity"


def test_a_bank_changed_during_the_run_is_refused_whatever_changed(tmp_path) -> None:
    """A worker opening the bank refuses another revision and another bank id (a bank replaced by
    another one at the same path), not only a revision that moved."""
    from _bank_helpers import LABELS, HashEmbedder
    from RetrievalSegLib.bank.support_bank import SupportBank
    from RetrievalSegLib.cohort.volume_job import ReadOnlyBank

    bank = SupportBank.create(tmp_path / "bank", LABELS, HashEmbedder().identity)
    ReadOnlyBank(bank.path, expect=(bank.bank_id, bank.revision))  # unchanged: accepted
    for expect in [(bank.bank_id, bank.revision + 1), ("another-bank-id", bank.revision)]:
        with pytest.raises(RuntimeError, match="changed during the cohort run"):
            ReadOnlyBank(bank.path, expect=expect)
