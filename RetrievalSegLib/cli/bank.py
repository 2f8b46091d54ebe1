"""`rseg bank ...`: create, fill, list, retire/restore, verify, export and import support banks.

Exit codes: 0 ok, 1 failure (including a verify that found problems), 2 usage error.
The DINOv2 embedder is only built by commands that need it (create needs its identity; add,
add-slice, reembed and verify --reembed / --repair need the model), through the `make_embedder(args)`
callable the parent command passes in.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ..bank.support_bank import BankCorruptError, BankEntry, BankError, LabelInfo, SupportBank, VerifyReport
from .common import _UsageError, _window  # one --window/--level rule for every command

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

#: Default label colours (matplotlib tab10), in label order.
DEFAULT_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[misc]
    for h in ("d62728", "2ca02c", "1f77b4", "ff7f0e", "9467bd", "8c564b", "e377c2", "7f7f7f",
              "bcbd22", "17becf")
)

MakeEmbedder = Callable[[argparse.Namespace], Any]


def parse_labels(text: str) -> list[tuple[int, str]]:
    """'1:RV,2:Myo,3:LV' -> [(1, 'RV'), (2, 'Myo'), (3, 'LV')] (argparse type)."""
    out: list[tuple[int, str]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition(":")
        try:
            v = int(value.strip())
        except ValueError:
            v = -1
        if not sep or not name.strip() or v < 1:
            raise argparse.ArgumentTypeError(
                f"label {item.strip()!r} must be VALUE:NAME with VALUE >= 1, e.g. '1:RV,2:Myo,3:LV'"
            )
        name = name.strip()
        if any(ch in name for ch in ":;"):
            raise argparse.ArgumentTypeError(
                f"label name {name!r} (in {item.strip()!r}) holds ':' or ';'; separate labels with commas, "
                "e.g. '1:RV,2:Myo,3:LV'"
            )
        if any(v == seen for seen, _ in out):
            raise argparse.ArgumentTypeError(f"label value {v} is given twice in {text!r}; each value names one label")
        if any(name.lower() == seen.lower() for _, seen in out):
            raise argparse.ArgumentTypeError(f"label name {name!r} is given twice in {text!r}; names must be unique")
        out.append((v, name))
    if not out:
        raise argparse.ArgumentTypeError("give at least one label, e.g. '1:RV,2:Myo,3:LV'")
    return out


def _hex_color(text: str) -> tuple[float, float, float]:
    h = text.strip().lstrip("#")
    if len(h) != 6:
        raise ValueError(text)
    return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def parse_colors(text: str) -> dict[int, tuple[float, float, float]] | list[tuple[float, float, float]]:
    """'1:#ff0000,2:#00ff00' (by value) or '#ff0000,#00ff00' (in label order) (argparse type)."""
    by_value: dict[int, tuple[float, float, float]] = {}
    in_order: list[tuple[float, float, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if ":" in item:
                value, _, color = item.partition(":")
                by_value[int(value)] = _hex_color(color)
            else:
                in_order.append(_hex_color(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"colour {item!r} must be #RRGGBB or VALUE:#RRGGBB, e.g. '1:#d62728,2:#2ca02c'"
            ) from None
    if by_value and in_order:
        raise argparse.ArgumentTypeError("give colours either all as VALUE:#RRGGBB or all as #RRGGBB")
    return by_value if by_value else in_order


def parse_slices(text: str) -> list[int]:
    """'3,5,7' or '3-7' -> slice indices (argparse type)."""
    out: list[int] = []
    try:
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            if "-" in item:
                lo, hi = (int(x) for x in item.split("-", 1))
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"slices must look like '3,5,7' or '3-7', got {text!r}") from None
    return out


def _err(msg: str) -> None:
    print(f"rseg bank: error: {msg}", file=sys.stderr)


def _adding(add: Callable[[], Any]) -> Any:
    """Run an add, printing the bank's warnings (blank slices) as `rseg bank: warning: ...`."""
    from ..bank.support_bank import BlankSliceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BlankSliceWarning)
        result = add()
    for w in caught:
        if issubclass(w.category, BlankSliceWarning):
            print(f"rseg bank: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _UsageError as e:
            _err(str(e))
            return EXIT_USAGE
        except BrokenPipeError:
            raise  # the reader of stdout stopped (`| head`): main() ends quietly
        except (BankError, ValueError, TypeError, LookupError, OSError) as e:
            _err(str(e))
            return EXIT_FAILURE

    run.__name__ = handler.__name__
    return run


def _entry_row(e: BankEntry) -> str:
    labels = ",".join(str(v) for v in e.labels_present) or "-"
    return (
        f"{e.id:<34} {e.case_id:<16} {'ijk'[e.axis]}={e.index:<5} {e.origin:<10} {e.status:<8} "
        f"{labels:<10} {e.added[:19]}"
    )


def _entry_json(e: BankEntry) -> dict[str, Any]:
    d = e.to_json()
    d["status"] = e.status
    return d


def add_bank_parser(
    subparsers: Any,
    make_embedder: MakeEmbedder,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add the `bank` command to an argparse subparsers object.

    `make_embedder(args)` builds the SliceEmbedder from the model options; `parents` (optional)
    are parsers whose options (e.g. --dinov2, --device, --random-weights) are added to the
    sub-commands that build an embedder.
    """
    parents = list(parents)
    bank = subparsers.add_parser(
        "bank", help="create and manage support banks",
        description="Create and manage support banks: the annotated slices RetrievalSeg retrieves from.",
    )
    sub = bank.add_subparsers(dest="bank_command", metavar="COMMAND")
    sub.required = True

    # -- create
    p = sub.add_parser("create", parents=parents, help="make a new empty bank",
                       description="Make a new, empty support bank folder for the given labels.")
    p.add_argument("bank", type=Path, metavar="BANK", help="new (or empty) folder")
    p.add_argument("--labels", type=parse_labels, required=True, metavar="V:NAME,...",
                   help="label values and names, e.g. '1:RV,2:Myo,3:LV'")
    p.add_argument("--colors", type=parse_colors, default=None, metavar="COLORS",
                   help="'1:#d62728,2:#2ca02c' or '#d62728,#2ca02c' (default: a fixed palette)")

    def cmd_create(args: argparse.Namespace) -> int:
        colors = args.colors if args.colors is not None else []
        infos = []
        for n, (value, name) in enumerate(args.labels):
            if isinstance(colors, dict):
                color = colors.get(value, DEFAULT_COLORS[n % len(DEFAULT_COLORS)])
            elif n < len(colors):
                color = colors[n]
            else:
                color = DEFAULT_COLORS[n % len(DEFAULT_COLORS)]
            infos.append(LabelInfo(value, name, color))
        if isinstance(colors, dict):
            extra = sorted(set(colors) - {v for v, _ in args.labels})
            if extra:
                raise _UsageError(f"--colors names values {extra} that are not in --labels")
        elif len(colors) > len(infos):
            raise _UsageError(f"--colors gives {len(colors)} colours for {len(infos)} labels")
        if Path(args.bank).exists() and Path(args.bank).is_dir() and any(Path(args.bank).iterdir()):
            raise FileExistsError(f"cannot create a support bank at {args.bank}: the folder is not empty")
        identity = make_embedder(args).identity
        b = SupportBank.create(args.bank, infos, identity)
        labels = ", ".join(f"{lab.value}={lab.name}" for lab in b.labels)
        print(f"created support bank {b.path} (labels {labels}; embeddings by {identity})")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_create))

    # -- add
    p = sub.add_parser("add", parents=parents, help="add the annotated slices of a volume",
                       description="Add every annotated slice of IMAGE (labels from LABELS) to the bank.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("image", type=Path, metavar="IMAGE", help="image volume (NIfTI, NRRD, DICOM folder...)")
    p.add_argument("labels", type=Path, metavar="LABELS", help="label map on the image's grid")
    p.add_argument("--case", required=True, metavar="ID", help="patient/study id (for honest evaluation)")
    p.add_argument("--axis", default="auto", choices=["auto", "i", "j", "k", "0", "1", "2"],
                   help="slice axis (default: the through-plane axis, largest spacing)")
    p.add_argument("--negatives", type=int, default=0, metavar="N",
                   help="also add up to N evenly spaced empty slices as negatives")
    p.add_argument("--slices", type=parse_slices, default=None, metavar="LIST",
                   help="add only these slice indices, e.g. '3,5,7' or '10-14'")
    p.add_argument("--window", type=float, default=None, metavar="W", help="intensity window width")
    p.add_argument("--level", type=float, default=None, metavar="L", help="intensity window level")
    p.add_argument("--json", action="store_true", help="print the added entries as JSON")

    def cmd_add(args: argparse.Namespace) -> int:
        from ..data.volume import read_volume

        if args.negatives < 0:
            raise _UsageError(f"--negatives must be >= 0, got {args.negatives}")
        window = _window(args)
        b = SupportBank.open(args.bank)
        image, labels = read_volume(args.image), read_volume(args.labels)
        embedder = make_embedder(args)
        b.check_models(embedder.identity)
        added = _adding(lambda: b.add_volume(image, labels, args.case, embedder, axis=args.axis, window=window,
                                             negatives=args.negatives, slices=args.slices))
        if args.json:
            print(json.dumps({"bank": str(b.path), "added": [_entry_json(e) for e in added]}, indent=1))
        else:
            neg = sum(1 for e in added if not e.labels_present)
            print(f"added {len(added)} slices of case {args.case} to {b.path} "
                  f"({len(added) - neg} annotated, {neg} empty); the bank has {len(b)} active entries")
            for e in added:
                print("  " + _entry_row(e))
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_add))

    # -- add-slice
    p = sub.add_parser("add-slice", parents=parents, help="add one (corrected) slice",
                       description="Add one slice of IMAGE with its labels as a correction; an older "
                                   "active entry of the same case, axis and index is retired.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("labels", type=Path, metavar="LABELS")
    p.add_argument("--case", required=True, metavar="ID")
    p.add_argument("--axis", required=True, choices=["i", "j", "k", "0", "1", "2"])
    p.add_argument("--index", required=True, type=int, metavar="N", help="slice index along --axis")
    p.add_argument("--window", type=float, default=None, metavar="W")
    p.add_argument("--level", type=float, default=None, metavar="L")
    p.add_argument("--json", action="store_true")

    def cmd_add_slice(args: argparse.Namespace) -> int:
        from ..data.volume import read_volume

        window = _window(args)
        b = SupportBank.open(args.bank)
        image, labels = read_volume(args.image), read_volume(args.labels)
        embedder = make_embedder(args)
        b.check_models(embedder.identity)
        (e,) = _adding(lambda: b.add_volume(image, labels, args.case, embedder, axis=args.axis, window=window,
                                            slices=[args.index], origin="correction"))
        if args.json:
            print(json.dumps({"bank": str(b.path), "added": [_entry_json(e)]}, indent=1))
        else:
            print(f"added {e.id} to {b.path}")
            replaced = [x for x in b.entries(include_retired=True) if x.retired_by == e.id]
            for x in replaced:
                print(f"  retired {x.id} (restore it with `rseg bank restore {b.path} {x.id}`)")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_add_slice))

    # -- list
    p = sub.add_parser("list", help="list entries", description="List the entries of a bank.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--all", action="store_true", help="include retired entries")
    p.add_argument("--case", default=None, metavar="ID", help="only this case")
    p.add_argument("--json", action="store_true")

    def cmd_list(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        entries = b.list_entries(include_retired=args.all, case_id=args.case)
        if args.json:
            print(json.dumps({
                "bank": str(b.path),
                "labels": [lab.to_json() for lab in b.labels],
                "dinov2": b.dinov2_identity,
                "retrieval_features": list(b.retrieval_features),
                "sam2": list(b.sam2_identities),
                "active": len(b),
                "entries": [_entry_json(e) for e in entries],
            }, indent=1))
            return EXIT_OK
        labels = ", ".join(f"{lab.value}={lab.name}" for lab in b.labels)
        total = len(b.entries(include_retired=True))
        print(f"support bank {b.path}: {len(b)} active of {total} entries; labels {labels}; "
              f"embeddings by {b.dinov2_identity}; retrieval features {', '.join(b.retrieval_features)}")
        if entries:
            print(f"{'id':<34} {'case':<16} {'slice':<7} {'origin':<10} {'status':<8} {'labels':<10} added (UTC)")
            for e in entries:
                print(_entry_row(e))
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_list))

    # -- info
    p = sub.add_parser("info", help="what a bank holds: labels, models, retrieval features, counts",
                       description="Print what the bank holds: entries (active, retired, damaged), labels, the "
                                   "DINOv2 identity of its embeddings and every retrieval feature it holds "
                                   "embeddings of (add one with `rseg bank reembed`), schema and revision.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--json", action="store_true")

    def cmd_info(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        every = b.entries(include_retired=True)
        info = {
            "bank": str(b.path), "bank_id": b.bank_id, "schema_version": b.schema_version, "revision": b.revision,
            "entries": len(every), "active": len(b), "retired": sum(e.retired for e in every),
            "damaged": sum(e.damaged is not None for e in every),
            "labels": [lab.to_json() for lab in b.labels], "dinov2": b.dinov2_identity,
            "embedding_dim": b.embedding_dim, "retrieval_features": list(b.retrieval_features),
            "retrieval_feature_identities": list(b.feature_identities()),
        }
        if args.json:
            print(json.dumps(info, indent=1))
            return EXIT_OK
        labels = ", ".join(f"{lab.value}={lab.name}" for lab in b.labels)
        print(f"support bank {b.path} (schema {info['schema_version']}, revision {info['revision']})\n"
              f"  entries: {info['active']} active, {info['retired']} retired, {info['damaged']} damaged\n"
              f"  labels: {labels}\n  embeddings by {b.dinov2_identity} ({b.embedding_dim or '-'}-d)\n"
              f"  retrieval features: {', '.join(b.retrieval_features)} (add one with "
              f"`rseg bank reembed {b.path} --retrieval-feature F`)")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_info))

    # -- remove / restore
    p = sub.add_parser("remove", help="retire an entry (kept, restorable)",
                       description="Retire an entry: it stays in the bank but is no longer retrieved.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("entry_id", metavar="ID")

    def cmd_remove(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        was = b.entry(args.entry_id)
        e = b.remove(args.entry_id)
        if was.retired:
            print(f"{e.id} was already retired")
        else:
            print(f"retired {e.id}; undo with `rseg bank restore {b.path} {e.id}`")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_remove))

    p = sub.add_parser("restore", help="bring a retired entry back",
                       description="Un-retire an entry; the active entry of the same slice, if any, is retired.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("entry_id", metavar="ID")

    def cmd_restore(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        e = b.restore(args.entry_id)
        print(f"{e.id} is active")
        for x in b.entries(include_retired=True):
            if x.retired_by == e.id:
                print(f"  retired {x.id} (same case and slice)")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_restore))

    # -- verify
    p = sub.add_parser("verify", parents=parents, help="check (and repair) a bank",
                       description="Check every file against the bank's index. --repair rebuilds what is "
                                   "rebuildable and marks damaged entries; --reembed recomputes all "
                                   "embeddings with the selected DINOv2 model (implies --repair).")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--repair", action="store_true")
    p.add_argument("--reembed", action="store_true")
    p.add_argument("--json", action="store_true")

    def cmd_verify(args: argparse.Namespace) -> int:
        try:
            b = SupportBank.open(args.bank)
        except BankCorruptError as e:  # an index that cannot be opened is verify's finding, never OK
            report = VerifyReport(args.bank, problems=[str(e)])
            print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
            return EXIT_FAILURE
        embedder: Any = None
        if args.reembed:
            embedder = make_embedder(args)
        elif args.repair:
            embedder = lambda: make_embedder(args)  # noqa: E731 - built only if rows need rebuilding
        report = b.verify(embedder=embedder, repair=args.repair or args.reembed, reembed=args.reembed)
        if args.json:
            print(json.dumps(report.to_json(), indent=1))
        else:
            print(report.summary())
            if report.repairable and not args.repair:  # never a suggestion that cannot help
                print(f"run `rseg bank verify {b.path} --repair` to fix what can be fixed")
        return EXIT_OK if report.ok else EXIT_FAILURE

    p.set_defaults(func=_guarded(cmd_verify))

    # -- reembed (add a retrieval feature)
    p = sub.add_parser("reembed", parents=parents, help="add a retrieval feature's embeddings",
                       description="Add the embeddings of --retrieval-feature F to the bank, beside those it "
                                   "holds (same DINOv2 model and input size; one pass over the entry files). "
                                   "The bank then answers segment/evaluate with any of its features, and every "
                                   "slice added later gets a row of each. Nothing to do when it holds F already. "
                                   "To replace the embeddings (another DINOv2 model): `verify --reembed`.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("--json", action="store_true")

    def cmd_reembed(args: argparse.Namespace) -> int:
        from .common import _progress_bar

        b = SupportBank.open(args.bank)
        embedder = make_embedder(args)
        update, close = _progress_bar(sys.stderr.isatty(), "embedding")
        try:
            added = b.add_feature(embedder, progress=update)
        finally:
            close()
        feature = b.retrieval_features[-1] if added else args.retrieval_feature
        if args.json:
            print(json.dumps({"bank": str(b.path), "added": added, "retrieval_feature": feature,
                              "retrieval_features": list(b.retrieval_features)}, indent=1))
        elif added:
            print(f"added the {feature} embeddings of {len(b.entries(include_retired=True))} entries to {b.path} "
                  f"(retrieval features {', '.join(b.retrieval_features)})")
        else:
            print(f"support bank at {b.path} holds the {feature} embeddings already (retrieval features "
                  f"{', '.join(b.retrieval_features)}); nothing to do")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_reembed))

    # -- export / import
    p = sub.add_parser("export", help="write the bank to one .zip or .tar.gz",
                       description="Write the bank (without memory caches) to one archive file.")
    p.add_argument("bank", type=Path, metavar="BANK")
    p.add_argument("archive", type=Path, metavar="ARCHIVE", help="ends in .zip, .tar.gz or .tgz")

    def cmd_export(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        out = b.export(args.archive)
        size = out.stat().st_size / 1e6
        print(f"exported {len(b.entries(include_retired=True))} entries of {b.path} to {out} ({size:.1f} MB)")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_export))

    p = sub.add_parser("import", help="unpack an exported bank",
                       description="Unpack an archive made by `rseg bank export` into a new folder and verify it.")
    p.add_argument("archive", type=Path, metavar="ARCHIVE")
    p.add_argument("bank", type=Path, metavar="BANK", help="new (or empty) folder")

    def cmd_import(args: argparse.Namespace) -> int:
        b = SupportBank.import_archive(args.archive, args.bank)
        print(f"imported {len(b.entries(include_retired=True))} entries ({len(b)} active) into {b.path}")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_import))

    # -- upgrade
    p = sub.add_parser("upgrade", help="move a schema-1 bank's index into SQLite (schema 2)",
                       description="Upgrade a bank written by RetrievalSeg before schema 2 (bank.json + "
                                   "embeddings.npy) to schema 2 (bank.db, SQLite). The old files are kept in "
                                   "backup-v1-<time>/ inside the bank. Happens automatically on the first "
                                   "change; a read-only bank needs someone with write access to run this.")
    p.add_argument("bank", type=Path, metavar="BANK")

    def cmd_upgrade(args: argparse.Namespace) -> int:
        b = SupportBank.open(args.bank)
        backup = b.upgrade()
        if backup is None:
            print(f"support bank at {b.path} already has schema version {b.schema_version}; nothing to do")
        else:
            print(f"upgraded {b.path} to schema version {b.schema_version} ({len(b.entries(include_retired=True))} "
                  f"entries); the old bank.json and embeddings.npy are in {backup}")
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_upgrade))

    # -- cache
    p = sub.add_parser("cache", parents=parents, help="memory cache: --stats, --clear or --warm",
                       description="The SAM 2 memory caches of a bank (rebuildable). --stats: files and bytes; "
                                   "--clear: delete them; --warm: compute every usable entry's memory once "
                                   "(with the selected SAM 2 model), up to the cap, and say how many did "
                                   "not fit. Cap: --cap-gb, else RSEG_MEMORY_CACHE_GB, else 4 GB.")
    p.add_argument("bank", type=Path, metavar="BANK")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--stats", action="store_true")
    what.add_argument("--clear", action="store_true")
    what.add_argument("--warm", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="a cache folder of your own (e.g. shared by a cohort run) instead of the per-user one "
                        "($RSEG_CACHE_DIR or ~/.cache/retrievalseg)")
    p.add_argument("--cap-gb", type=float, default=None, metavar="GB", help="cache size cap in GB")
    p.add_argument("--json", action="store_true")

    def cmd_cache(args: argparse.Namespace) -> int:
        from ..bank.cache import cache_stats, clear_caches, warm
        from ..engine.memory_cache import memory_cache_cap

        b = SupportBank.open(args.bank)
        if args.cache_dir is not None:
            from ..bank.cache import check_cache_dir

            try:
                check_cache_dir(b.path, args.cache_dir)
            except ValueError as e:
                raise _UsageError(f"--cache-dir: {e}") from None
        if args.cap_gb is not None and not args.cap_gb >= 0:
            raise _UsageError(f"--cap-gb must be a size in GB >= 0, got {args.cap_gb}")
        cap = memory_cache_cap(args.cap_gb)
        if args.stats:
            out = cache_stats(b, args.cache_dir, cap)
            text = (f"{out['files']} cached memories, {out['bytes'] / 1e6:.1f} MB of a {cap / 2**30:g} GB cap, "
                    f"for {out['usable_entries']} usable entries"
                    + "".join(f"\n  {f['folder']}: {f['files']} files, {f['bytes'] / 1e6:.1f} MB" for f in out["folders"]))
        elif args.clear:
            out = {"deleted": clear_caches(b, args.cache_dir)}
            text = f"deleted {out['deleted']} cached memories of {b.path} (they are recomputed on use)"
        else:
            from ..engine.build import make_engine
            from .common import _progress_bar

            engine = make_engine(args)
            b.check_models(engine.dinov2_identity)
            update, close = _progress_bar(sys.stderr.isatty(), "warming")
            try:
                from ..engine.sam2_memory import resolve_precision

                prec = resolve_precision(args.precision, engine.sam.device)  # the cache `segment` reads
                out = warm(b, engine, precision=prec, cache_dir=args.cache_dir, max_bytes=cap, progress=update)
            finally:
                close()
            text = (f"warmed {out['computed']} memories ({out['already_cached']} were cached already), "
                    f"{out['bytes'] / 1e6:.1f} MB of a {cap / 2**30:g} GB cap in {out['folder']}")
            if out["did_not_fit"]:
                text += (f"; {out['did_not_fit']} of {out['entries']} did not fit under the cap (they are "
                         "computed when used): raise it with --cap-gb or RSEG_MEMORY_CACHE_GB")
        print(json.dumps(out, indent=1) if args.json else text)
        return EXIT_OK

    p.set_defaults(func=_guarded(cmd_cache))
    return bank
