"""A bank holds embeddings per retrieval feature: `rseg bank reembed --retrieval-feature F` adds F
beside what it holds, every entry has a row of every feature (added later too), a search with F's
embedder reads F's rows, and verify, repair, export and import keep them all."""
from __future__ import annotations

import argparse
import json
import sqlite3
import zipfile

import numpy as np
import pytest

from RetrievalSegLib.bank.support_bank import BankCorruptError, BankError, BankModelMismatchError, SupportBank
from RetrievalSegLib.cli.bank import add_bank_parser
from RetrievalSegLib.segmentation.queries import retrieve

from _bank_helpers import LABELS, FeatureHashEmbedder, HashEmbedder, make_case


def _bank(tmp_path, name="bank"):
    cls = FeatureHashEmbedder("cls")
    bank = SupportBank.create(tmp_path / name, LABELS, cls.identity)
    bank.add_volume(*make_case(0), "p01", cls)
    return bank


def _feature_rows(bank, feature):
    return bank._state_and_rows(FeatureHashEmbedder(feature).identity)[1]


def _images(bank):
    return [bank.load_entry(e.id).image for e in bank.entries(include_retired=True)]


def test_reembed_adds_a_feature_beside_the_primary_and_is_idempotent(tmp_path):
    bank = _bank(tmp_path)
    primary = np.array(bank.embeddings())
    mean = FeatureHashEmbedder("mean")
    with pytest.raises(BankModelMismatchError, match=r"retrieval feature cls in the bank, mean asked for.*"
                                                      r"rseg bank reembed .* --retrieval-feature mean"):
        bank.check_models(mean.identity)
    assert bank.add_feature(mean) is True
    assert bank.retrieval_features == ("cls", "mean")
    bank.check_models(mean.identity)
    bank.check_models(FeatureHashEmbedder("cls").identity)  # the primary still answers
    np.testing.assert_array_equal(bank.embeddings(), primary)  # nothing of it changed
    np.testing.assert_array_equal(_feature_rows(bank, "mean"), mean.embed(_images(bank)))
    revision = bank.revision
    assert bank.add_feature(FeatureHashEmbedder("mean")) is False  # idempotent: nothing written
    assert bank.add_feature(FeatureHashEmbedder("cls")) is False
    assert bank.revision == revision
    reopened = SupportBank.open(bank.path)
    assert reopened.retrieval_features == ("cls", "mean")
    np.testing.assert_array_equal(_feature_rows(reopened, "mean"), mean.embed(_images(bank)))


def test_a_feature_from_another_dinov2_is_refused_with_the_replacing_command(tmp_path):
    bank = _bank(tmp_path)
    other = FeatureHashEmbedder("mean", name="dinov2-base:hash")
    with pytest.raises(BankModelMismatchError, match="same DINOv2 model and input size.*rseg bank verify --reembed"):
        bank.add_feature(other)
    with pytest.raises(BankModelMismatchError, match="re-embed it with `rseg bank verify --reembed"):
        bank.check_models(other.identity)
    assert bank.retrieval_features == ("cls",) and bank.revision == 1


def test_every_entry_added_later_gets_a_row_of_every_feature(tmp_path):
    bank = _bank(tmp_path)
    bank.add_feature(FeatureHashEmbedder("gem"))
    bank.add_feature(FeatureHashEmbedder("cls+mean"))
    adder = FeatureHashEmbedder("gem")  # any stored feature's embedder adds; one pass gives every feature
    bank.add_volume(*make_case(1), "p02", adder)
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    bank.add_slice(img, {1: img > 100}, "p03", "k", 0, (1.0, 1.0), adder)
    assert adder.passes == 2
    images = _images(bank)
    for feature in ("cls", "gem", "cls+mean"):
        rows = bank.embeddings() if feature == "cls" else _feature_rows(bank, feature)
        np.testing.assert_array_equal(rows, FeatureHashEmbedder(feature).embed(images), err_msg=feature)
    assert _feature_rows(bank, "cls+mean").shape == (len(images), 32)
    report = bank.verify()
    assert report.ok, report.summary()


def test_an_embedder_that_computes_one_feature_cannot_add_to_a_bank_of_two(tmp_path):
    emb = HashEmbedder()  # no embed_features
    bank = SupportBank.create(tmp_path / "bank", LABELS, emb.identity)
    bank.add_volume(*make_case(0), "p01", emb)
    bank.add_feature(FeatureHashEmbedder("mean"))  # the stand-ins share the identity's model and size
    revision, entries = bank.revision, len(bank.entries(include_retired=True))
    with pytest.raises(BankError, match="computes only cls.*cannot get a row of each"):
        bank.add_volume(*make_case(1), "p02", emb)
    assert bank.revision == revision and len(bank.entries(include_retired=True)) == entries


def test_search_with_a_feature_reads_that_features_rows(tmp_path):
    bank = _bank(tmp_path)
    mean = FeatureHashEmbedder("mean")
    bank.add_feature(mean)
    images = _images(bank)
    rows = mean.embed(images)
    q = rows[2:3]
    hits = bank.search(q, 3, case_policy="ignore", embedder_identity=mean.identity)[0]
    expect = np.argsort(-(rows @ q[0]), kind="stable")[:3]
    ids = [e.id for e in bank.entries(include_retired=True)]
    assert [h[0] for h in hits] == [ids[j] for j in expect]
    np.testing.assert_allclose([h[1] for h in hits], (rows @ q[0])[expect], rtol=1e-6)
    # retrieve() passes the embedder's identity: the slices are compared with mean rows, not cls rows
    found = retrieve(mean, bank, images[2:3], 1, case_policy="ignore")
    assert found.hits[0][0][0] == ids[2] and found.hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(BankModelMismatchError, match="rseg bank reembed"):
        bank.search(q, 1, case_policy="ignore", embedder_identity=FeatureHashEmbedder("gem").identity)
    wide = FeatureHashEmbedder("cls+mean")  # twice the primary's width: its own index
    bank.add_feature(wide)
    wrows = wide.embed(images)
    hits = bank.search(wrows[1:2], 1, case_policy="ignore", embedder_identity=wide.identity)[0]
    assert hits[0][0] == ids[1] and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert bank.search(q, 1, case_policy="ignore", embedder_identity=mean.identity)[0][0][0] == ids[2]


def test_replacing_the_primary_keeps_the_further_features(tmp_path):
    bank = _bank(tmp_path)
    bank.add_feature(FeatureHashEmbedder("mean"))
    gem = FeatureHashEmbedder("gem")
    bank.reembed(gem)  # `verify --reembed --retrieval-feature gem`: replaces cls, as before
    assert bank.retrieval_features == ("gem", "mean")
    with pytest.raises(BankModelMismatchError):
        bank.check_models(FeatureHashEmbedder("cls").identity)
    np.testing.assert_array_equal(bank.embeddings(), gem.embed(_images(bank)))
    base = FeatureHashEmbedder("cls", name="dinov2-base:hash")
    bank.reembed(base)  # another model: the further features are recomputed with it
    assert bank.retrieval_features == ("cls", "mean")
    np.testing.assert_array_equal(bank._state_and_rows(base.identity_of("mean"))[1],
                                  FeatureHashEmbedder("mean", name="dinov2-base:hash").embed(_images(bank)))


def _break_feature_row(bank, feature="mean"):
    bank.close()
    con = sqlite3.connect(bank.path / "bank.db", isolation_level=None)
    con.execute("UPDATE feature_embeddings SET row = zeroblob(length(row)) WHERE feature = ? AND seq = 1", (feature,))
    con.close()


def test_verify_checks_every_feature_and_repair_rebuilds_it(tmp_path):
    bank = _bank(tmp_path)
    mean = FeatureHashEmbedder("mean")
    bank.add_feature(mean)
    _break_feature_row(bank)
    bank = SupportBank.open(bank.path)
    report = bank.verify()
    assert not report.ok and any("mean embedding rows" in p for p in report.problems), report.summary()
    report = bank.verify(embedder=FeatureHashEmbedder("cls"), repair=True)
    assert report.ok, report.summary()
    assert any("rebuilt the mean embeddings" in a for a in report.actions)
    np.testing.assert_array_equal(_feature_rows(bank, "mean"), mean.embed(_images(bank)))


def test_export_and_import_carry_every_feature(tmp_path):
    bank = _bank(tmp_path)
    bank.add_feature(FeatureHashEmbedder("cls+mean"))
    archive = bank.export(tmp_path / "bank.zip")
    with zipfile.ZipFile(archive) as zf:
        listed = json.loads(zf.read("bank.json"))["features"]
        assert [d["feature"] for d in listed] == ["cls+mean"] and "embeddings-cls-mean.npy" in zf.namelist()
    copy = SupportBank.import_archive(archive, tmp_path / "copy")
    assert copy.retrieval_features == ("cls", "cls+mean")
    np.testing.assert_array_equal(_feature_rows(copy, "cls+mean"), _feature_rows(bank, "cls+mean"))
    np.testing.assert_array_equal(copy.embeddings(), bank.embeddings())
    assert copy.verify().ok


def test_an_archive_whose_feature_rows_were_changed_is_not_imported(tmp_path):
    bank = _bank(tmp_path)
    bank.add_feature(FeatureHashEmbedder("mean"))
    archive = bank.export(tmp_path / "bank.zip")
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "embeddings-mean.npy":
                data = data[:-4] + b"\0\0\0\0"
            dst.writestr(name, data)
    with pytest.raises(BankCorruptError, match="embeddings-mean.npy.*nothing was imported"):
        SupportBank.import_archive(bad, tmp_path / "copy")
    assert not (tmp_path / "copy").exists() or not any((tmp_path / "copy").iterdir())


def test_cli_reembed_adds_a_feature_and_list_shows_them(tmp_path, capsys):
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--retrieval-feature", dest="retrieval_feature", default="cls")
    parser = argparse.ArgumentParser(prog="rseg")
    add_bank_parser(parser.add_subparsers(dest="command"), lambda a: FeatureHashEmbedder(a.retrieval_feature),
                    parents=[model])

    def rseg(*argv) -> int:
        args = parser.parse_args(["bank", *map(str, argv)])
        return args.func(args)

    bank = _bank(tmp_path)
    assert rseg("reembed", bank.path, "--retrieval-feature", "gem") == 0
    assert "added the gem embeddings" in capsys.readouterr().out
    assert rseg("reembed", bank.path, "--retrieval-feature", "gem", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"bank": str(bank.path), "added": False, "retrieval_feature": "gem",
                                                   "retrieval_features": ["cls", "gem"]}
    assert rseg("list", bank.path) == 0
    assert "retrieval features cls, gem" in capsys.readouterr().out
    assert rseg("info", bank.path) == 0
    assert "retrieval features: cls, gem" in capsys.readouterr().out
    assert rseg("info", bank.path, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["retrieval_features"] == ["cls", "gem"] and info["active"] == len(bank) and info["damaged"] == 0
    assert info["retrieval_feature_identities"] == [FeatureHashEmbedder(f).identity for f in ("cls", "gem")]
    assert rseg("reembed", bank.path, "--retrieval-feature", "max") == 1  # the embedder refuses it, nothing added
    assert SupportBank.open(bank.path).retrieval_features == ("cls", "gem")
