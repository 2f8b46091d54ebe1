"""The accuracy switches --retrieval-feature and --support-filter reach every front end: the `rseg`
commands that segment (with the dest names `evaluate --compare` maps to), a cohort's identity
(an output made with another value is segmented again), the worker's settings and job options."""
from __future__ import annotations

import inspect

import pytest

from RetrievalSegLib.cli.main import build_parser
from RetrievalSegLib.cohort.volume_job import COHORT_OPTIONS, CohortVolume, resume_reason
from RetrievalSegLib.data.fileio import file_sha256
from RetrievalSegLib.engine.pipeline import RetrievalEngine
from RetrievalSegLib.segmentation.provenance import write_sidecar
from RetrievalSegLib.worker import protocol as wp

COMMANDS = {
    "segment": ["segment", "img.nii.gz", "--bank", "b", "--out", "o.nii.gz"],
    "evaluate": ["evaluate", "--test", "t", "--labels", "1:RV", "--out", "r"],
    "segment-cohort": ["segment-cohort", "c.csv", "--bank", "b", "--out", "o"],
    "bank verify": ["bank", "verify", "b"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_switches_parse_with_their_defaults_and_dest_names(command):
    parser = build_parser()
    args = parser.parse_args(COMMANDS[command])
    assert (args.retrieval_feature, args.support_filter) == ("cls", "all")
    args = parser.parse_args(COMMANDS[command] + ["--retrieval-feature", "cls+mean", "--support-filter", "foreground"])
    assert (args.retrieval_feature, args.support_filter) == ("cls+mean", "foreground")
    for bad in (["--retrieval-feature", "max"], ["--support-filter", "present"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(COMMANDS[command] + bad)
        assert e.value.code == 2


def test_cohort_identity_holds_both_switches(tmp_path):
    from RetrievalSegLib.cli.cohort import MODEL_ARGS, cohort_settings

    assert {"retrieval_feature", "support_filter"} <= set(COHORT_OPTIONS) and "retrieval_feature" in MODEL_ARGS
    args = build_parser().parse_args(COMMANDS["segment-cohort"] + ["--support-filter", "foreground",
                                                                     "--retrieval-feature", "gem"])

    class Bank:  # what cohort_settings reads of a SupportBank
        bank_id, revision = "abc", 4

    settings, model_args = cohort_settings(args, Bank(), None)
    assert settings.options["support_filter"] == "foreground" and settings.options["retrieval_feature"] == "gem"
    assert model_args["retrieval_feature"] == "gem"

    want = {"rseg_version": "0.1.0", "k": 8, "bank": {"bank_id": "abc", "revision": 4},
            "cohort_options": {n: settings.options.get(n) for n in COHORT_OPTIONS}}
    vol = CohortVolume("/data/a.nii.gz", "a", "a.nii.gz")
    out = tmp_path / "a.nii.gz"
    out.write_bytes(b"label map")
    write_sidecar(out, {**want, "output_sha256": file_sha256(out)}, [])
    assert resume_reason(tmp_path, vol, want) is None
    for name, value in (("support_filter", "all"), ("retrieval_feature", "cls")):
        other = {**want, "cohort_options": {**want["cohort_options"], name: value}}
        reason = resume_reason(tmp_path, vol, other)
        assert reason is not None and "cohort_options" in reason, (name, reason)


def test_worker_settings_carry_the_retrieval_feature_to_the_engine(monkeypatch):
    settings = wp.EngineSettings(device="cpu", random_weights=True, retrieval_feature="gem")
    assert wp.EngineSettings.from_json(settings.to_json()) == settings
    assert wp.EngineSettings().retrieval_feature == "cls"
    seen = {}
    signature = inspect.signature(RetrievalEngine.load.__func__)

    def load(cls, *a, **kw):  # refuses what the real load does not take
        seen.update(signature.bind(cls, *a, **kw).arguments["kwargs"] if "kwargs" in signature.parameters else
                    signature.bind(cls, *a, **kw).arguments)
        return "engine"

    monkeypatch.setattr(RetrievalEngine, "load", classmethod(load))
    assert settings.load() == "engine" and seen["retrieval_feature"] == "gem"

