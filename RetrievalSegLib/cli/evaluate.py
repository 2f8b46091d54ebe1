"""`rseg evaluate`: options and folders checked first, the bank built or reused, then
`evaluation.evaluate.evaluate` over the test cases (the library part)."""
from __future__ import annotations

import argparse
import json
import sys

from ..evaluation.evaluate import (
    CASES_DIR,
    PREDICTIONS_DIR,
    RANDOM_BANNER,
    EvaluationInterrupted,
    ExclusionError,
    ResultsExist,
    ResumeMismatch,
    check_plan,
    check_results_folder,
    evaluate,
    format_table,
)
from ..evaluation.study import (
    BUILD_FILE,
    LabelError,
    Study,
    StudyError,
    _few,
    build_bank_atomically,
    build_record,
    read_build_record,
    record_differences,
    remove_stale_builds,
    scan_study,
)
#: evaluate options `--compare` refuses, with the reason (every other option with a value can be compared).
NOT_COMPARABLE = {
    "train": "the cases and the bank are the same for every configuration",
    "test": "the cases are the same for every configuration",
    "bank": "the bank is the same for every configuration",
    "labels": "the bank is the same for every configuration",
    "pool": "the bank is the same for every configuration",
    "axis": "the bank is built along one axis",
    "window": "the bank is built with one window", "level": "the bank is built with one window",
    "dinov2": "the bank's embeddings are made with one DINOv2",
    "dinov2_path": "the bank's embeddings are made with one DINOv2",
    "dinov2_input_size": "the bank's embeddings are made with one DINOv2 input size",
    "random_weights": "a comparison of random and trained weights says nothing",
    "seed": "the seed of random weights is not a setting",
    "device": "the device is not an accuracy setting",
    "max_cases": "the cases are the same for every configuration",
    "out": "the output folder is one", "compare": "--compare itself",
    "sam2_checkpoint": "compare two checkpoints with two runs",
}


def comparable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of the evaluate options `--compare` accepts (options that take one value)."""
    return {a.dest: a for a in parser._actions
            if a.option_strings and a.nargs is None and a.dest not in NOT_COMPARABLE
            and isinstance(a, argparse._StoreAction)}


class CompareAction(argparse.Action):
    """`--compare NAME=V1,V2,...` (repeatable): NAME an evaluate option (dashes or underscores),
    each value parsed with that option's own type and choices ('default': its default). Checked
    while the command line is parsed, so a wrong one exits 2 before anything is loaded."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        text = str(values)
        options = comparable_actions(parser)
        valid = ", ".join(sorted(d.replace("_", "-") for d in options))
        name, eq, raw = text.partition("=")
        dest = name.strip().lstrip("-").replace("-", "_")
        if not eq or not raw.strip():
            parser.error(f"--compare {text!r}: give NAME=VALUE1,VALUE2,... (options that can be compared: {valid})")
        if dest in NOT_COMPARABLE:
            parser.error(f"--compare {name}: cannot be compared ({NOT_COMPARABLE[dest]}); options that can: {valid}")
        if dest not in options:
            parser.error(f"--compare {name}: not an option of rseg evaluate that can be compared; options that can: "
                         f"{valid}")
        action = options[dest]
        parsed = []
        for v in (x.strip() for x in raw.split(",")):
            if v == "default":
                parsed.append(action.default)
                continue
            try:
                value = action.type(v) if callable(action.type) else v
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                parser.error(f"--compare {name}: invalid value {v!r} for {action.option_strings[-1]}"
                             + (f" ({e})" if str(e) else ""))
            if action.choices is not None and value not in action.choices:
                parser.error(f"--compare {name}: invalid value {v!r} (choose from "
                             f"{', '.join(map(str, action.choices))})")
            parsed.append(value)
        grid = list(getattr(namespace, self.dest, None) or [])
        if any(d == dest for d, _ in grid):
            parser.error(f"--compare {name} given twice; give all its values in one --compare")
        grid.append((dest, parsed))
        setattr(namespace, self.dest, grid)


def _parse_eval_labels(text: str):
    from ..bank.support_bank import LabelInfo
    from .bank import DEFAULT_COLORS, parse_labels

    pairs = parse_labels(text)
    return [LabelInfo(v, n, DEFAULT_COLORS[i % len(DEFAULT_COLORS)]) for i, (v, n) in enumerate(pairs)]


def _skipped_lines(what: str, study: Study) -> list[str]:
    return [f"rseg evaluate: {what}: skipped {len(files)} {reason}: {_few(files, 3)}"
            for reason, files in study.skipped.items()]


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of `rseg evaluate`."""
    from ..bank.support_bank import SupportBank, same_subject
    from ..engine.build import make_embedder, make_engine
    from .common import _UsageError, _window

    def usage(e: Exception) -> _UsageError:
        return _UsageError(str(e))

    # Options and folders first: nothing is created or loaded before they are checked.
    labels = _parse_eval_labels(args.labels)
    window = _window(args)
    try:
        test_study = scan_study(args.test)
        train_study = scan_study(args.train) if args.train is not None else None
    except StudyError as e:
        raise usage(e) from None
    test = test_study.cases
    if args.max_cases is not None:
        test = test[: args.max_cases]
    if train_study is not None:
        overlap = sorted({c.subject for c in train_study.cases
                          if any(same_subject(c.subject, t.subject) for t in test)})
        if overlap:
            raise _UsageError(f"subjects in both --train and --test: {_few(overlap)}; a test subject must not "
                              "be in the training data")
    if args.pool is not None and train_study is None:
        raise _UsageError("--pool caps a bank built from --train; give --train too, or drop --pool to use "
                          "the bank as it is")
    try:  # before anything is built or loaded: results already in --out are never replaced by surprise
        check_results_folder(args.out, args.resume, args.overwrite)
    except ResultsExist as e:
        raise usage(e) from None
    configs = _configurations(args) if args.compare else None  # usage errors before any model loads
    bank_path = args.bank if args.bank is not None else args.out / "bank"
    show = not args.no_progress
    for line in _skipped_lines("--test", test_study) + (_skipped_lines("--train", train_study) if train_study else []):
        print(line, file=sys.stderr)

    has_bank = (bank_path / "bank.json").exists()
    record = read_build_record(bank_path) if has_bank else None
    rebuild_hint = (f"remove it (rm -r '{bank_path}') and run the same command again to rebuild it, "
                    "or give another --out / --bank")
    if has_bank and train_study is not None:
        if record is None:
            raise _UsageError(
                f"the bank at {bank_path} was not built completely by this rseg evaluate (no "
                f"{BUILD_FILE}: an interrupted build of an older version, or a bank made with `rseg bank`); "
                f"to use it as it is, drop --train and --pool; else {rebuild_hint}"
            )
        wanted = build_record(train_study, labels, args.pool, args.axis, window, record.get("dinov2"))
        diffs = record_differences(record, wanted)
        if diffs:
            raise _UsageError(f"the bank at {bank_path} was built with other parameters ({'; '.join(diffs)}); "
                              f"{rebuild_hint}")
    elif not has_bank and train_study is None:
        raise _UsageError("give --train (to build a bank) or --bank with an existing bank"
                          + (f" (no bank at {bank_path})" if args.bank is not None else ""))
    elif not has_bank and bank_path.exists() and any(bank_path.iterdir()):
        raise _UsageError(f"{bank_path} exists and is not a support bank; give another --out / --bank")

    features = list(dict.fromkeys(a.retrieval_feature for a in configs.values())) if configs else []
    if configs and has_bank and record is None:  # a bank of the user's: never changed by evaluate
        held = SupportBank.open(bank_path).retrieval_features
        missing = [f for f in features if f not in held]
        if missing:
            raise _UsageError(
                f"--compare retrieval-feature: the bank at {bank_path} holds embeddings of {', '.join(held)}, not "
                f"{', '.join(missing)}; add them with "
                + " and ".join(f"`rseg bank reembed {bank_path} --retrieval-feature {f}`" for f in missing)
                + " (keeps the others), or let evaluate build its own bank from --train")
    embedder = make_embedder(args)
    if has_bank:
        bank = SupportBank.open(bank_path)
        if record is not None and record.get("dinov2") != embedder.identity:
            raise _UsageError(f"the bank at {bank_path} was built with DINOv2 {record.get('dinov2')}, the "
                              f"engine uses {embedder.identity}; {rebuild_hint}")
        print(f"rseg evaluate: using the bank at {bank_path} ({len(bank)} entries"
              + (", built from the same --train, --pool and --labels)" if record is not None else ")"),
              file=sys.stderr)
    else:
        for stale in remove_stale_builds(bank_path):
            print(f"rseg evaluate: removed {stale} (an interrupted bank build)", file=sys.stderr)
        rec = build_record(train_study, labels, args.pool, args.axis, window, embedder.identity)
        try:
            bank = build_bank_atomically(train_study, bank_path, labels, embedder, args.axis, args.pool,
                                         window, show, rec)
        except LabelError as e:
            raise usage(e) from None
    try:
        for k in sorted({args.k} | {c_args.k for c_args in (configs or {}).values()}):
            check_plan(test, bank, [lab.value for lab in labels], k)
    except (LabelError, ExclusionError) as e:
        raise usage(e) from None
    bank_names = {lab.value: lab.name for lab in bank.labels}
    renamed = [f"{lab.value} is {bank_names[lab.value]!r} in the bank, {lab.name!r} in --labels"
               for lab in labels if bank_names.get(lab.value, lab.name) != lab.name]
    if renamed:
        print(f"rseg evaluate: warning: label {'; '.join(renamed)}; results use the bank's names",
              file=sys.stderr)
    skipped = {"test": {r: len(f) for r, f in test_study.skipped.items()},
               **({"train": {r: len(f) for r, f in train_study.skipped.items()}} if train_study else {})}
    if args.max_cases is not None and args.max_cases < len(test_study.cases):
        skipped["test"]["beyond --max-cases"] = len(test_study.cases) - args.max_cases
    extra = {"compile": bool(args.compile), "skipped_inputs": skipped,
             "test": str(args.test), "train": None if args.train is None else str(args.train)}

    def run(a: argparse.Namespace, engine, out, label: str = "evaluate ", more: dict | None = None) -> dict:
        """One evaluation with the options `a` (the command's, or a compared configuration's)."""
        return evaluate(test, bank, engine, labels=[lab.value for lab in labels], k=a.k, axis=a.axis,
                        window=window, out=out, save_predictions=a.save_predictions or a.report, progress=show,
                        precision=a.precision, batch_size=a.batch_size, resume=a.resume,
                        overwrite=a.overwrite, extra={**extra, **(more or {})}, progress_label=label,
                        support_order=a.support_order, propagate=a.propagate,
                        support_filter=getattr(a, "support_filter", "all"))

    try:
        if configs:
            return _compare(args, configs, run, show, bank, features)
        result = run(args, make_engine(args), args.out)
    except (LabelError, ExclusionError, ResumeMismatch, ResultsExist) as e:
        raise usage(e) from None
    except EvaluationInterrupted as e:
        print(f"rseg evaluate: interrupted; {len(e.finished)} finished case(s) kept in {args.out / CASES_DIR} and "
              f"{args.out / 'metrics.csv'}; run the same command with --resume"
              + (" instead of --overwrite" if args.overwrite else "") + " to skip them", file=sys.stderr)
        if e.kept:
            print(f"rseg evaluate: {len(e.kept)} case(s) not evaluated again keep their earlier results (files in "
                  f"{args.out / CASES_DIR} and {args.out / PREDICTIONS_DIR}, not in metrics.csv): {_few(e.kept, 5)}; "
                  "--resume reuses them only if they were made with the same settings", file=sys.stderr)
        raise
    for w in result.get("warnings", []):
        print(f"rseg evaluate: warning: {w}", file=sys.stderr)
    if args.report:
        from .report import report_after_run

        result["report"] = str(report_after_run(args.out, quiet=args.json))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2, allow_nan=False))
    else:
        print(format_table(result))
        excl = ", ".join(f"{cid} {info['excluded_supports']}" for cid, info in result["per_case"].items())
        print(f"supports excluded per case (own subject): {excl}")
        total_skipped = sum(sum(v.values()) for v in skipped.values())
        if total_skipped:
            print("skipped inputs: " + "; ".join(
                f"{where}: " + ", ".join(f"{n} {reason}" for reason, n in d.items())
                for where, d in skipped.items() if d))
        if result["random_weights"]:
            print(RANDOM_BANNER)
        print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'metrics.json'}")
    return 0


# ----------------------------------------------------------------------------- --compare
#: Compared options that do not change the models: configurations differing only in these share
#: one engine (SAM 2 loaded once, one memory cache). Any other compared option gets its own engine.
SHARES_MODELS = {"k", "precision", "batch_size", "support_order", "support_filter", "propagate",
                 "retrieval_feature"}  # (the same DINOv2 pass gives every feature: MemoEmbedder.for_feature)


def _configurations(args: argparse.Namespace) -> dict:
    """{Configuration: its options} for `--compare` (the reference first); usage errors before any model."""
    from ..evaluation.compare import configurations
    from ..models.loaders import check_image_size
    from .common import _UsageError

    configs = configurations(args.compare, {d: getattr(args, d) for d, _ in args.compare})
    out = {}
    for c in configs:
        a = argparse.Namespace(**vars(args))
        for d, v in c.values:
            setattr(a, d, v)
        if not c.reference:  # the report draws the reference's cases: only its predictions are needed
            a.report = False
        if a.image_size is not None:
            try:
                check_image_size(a.image_size)
            except ValueError as e:
                raise _UsageError(f"--compare image-size: {e}") from None
        out[c] = a
    if len(out) < 2:
        raise _UsageError(f"--compare gives only the reference configuration ({configs[0].name}); give other values")
    return out


def _compare(args: argparse.Namespace, configs: dict, run, show: bool, bank, features: list) -> int:
    """`rseg evaluate --compare`: every configuration, models shared, then the paired statistics.

    Every compared retrieval feature comes from the reference's DINOv2 (one model, one pass per
    slice set for all features); the bank built by evaluate gets the features it lacks first."""
    from ..engine.build import make_engine
    from ..evaluation.compare import MemoEmbedder, format_compare, run_compare

    engines: dict = {}
    memos: dict = {}

    def engine_for(c, a):
        key = tuple((d, repr(v)) for d, v in c.values if d not in SHARES_MODELS)
        if key not in engines:
            engine = make_engine(argparse.Namespace(**{**vars(a), "retrieval_feature": args.retrieval_feature}))
            inner = engine.embedder
            engine.embedder = memos.setdefault(id(inner), MemoEmbedder(inner, features))  # one DINOv2 pass
            engines[key] = engine
        engine = engines[key]
        return engine if a.retrieval_feature == args.retrieval_feature else \
            engine.with_embedder(engine.embedder.for_feature(a.retrieval_feature))

    reference = next(iter(configs))
    for feature in features:  # evaluate's own bank: the compared features' embeddings, one pass for all
        if feature not in bank.retrieval_features:
            memo = engine_for(reference, configs[reference]).embedder
            bank.add_feature(memo.for_feature(feature))
            print(f"rseg evaluate: added the {feature} embeddings to the bank at {bank.path}", file=sys.stderr)
    bank_passes = sum(m.passes for m in memos.values())

    def run_one(c, folder, label):
        a = configs[c]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            return run(a, engine_for(c, a), folder, label, {"configuration": c.name, "compare_reference": c.reference})
        except EvaluationInterrupted:
            print(f"rseg evaluate: interrupted in configuration {c.name} (its results: {folder}); compare.csv holds "
                  "the configurations finished before it, and `--resume` skips every finished configuration and "
                  "case", file=sys.stderr)
            raise

    doc = run_compare(list(configs), run_one, args.out)
    print(f"rseg evaluate: {len(configs)} configurations, {len(engines)} model set(s) loaded, "
          f"{sum(m.passes for m in memos.values()) - bank_passes} DINOv2 pass(es) over the test cases"
          + (f" (each gives the {len(features)} compared retrieval features)" if len(features) > 1 else ""),
          file=sys.stderr)
    if args.report:
        from .report import report_after_run

        doc["report"] = str(report_after_run(args.out, quiet=args.json))
    if args.json:
        print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=2, allow_nan=False))
    else:
        print(format_compare(doc))
        if doc["random_weights"]:
            print(RANDOM_BANNER)
        print(f"wrote {args.out / 'compare.csv'} and {args.out / 'compare.json'}")
    return 0
