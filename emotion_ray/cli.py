"""`emotion-ray <stage>`: each subcommand validates its config, then calls one entry point.

Flags are shortcuts for config keys; `--config FILE.yaml` and `--set key=value` reach every
key. Precedence: defaults < YAML < --set < flags. Exit codes: 0 ok, 2 bad config or input.
Quiet by default (console.py): Ray's and TensorFlow's messages go to a log file, the screen
keeps a bar and a short summary; `--verbose` shows everything, `--json` prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from typing import Any, Callable

from emotion_ray import console, summary
from emotion_ray.calibration import UNCERTAIN
from emotion_ray.config import (CrossValidationConfig, PredictConfig, PrepareConfig, ScoreConfig, TrainConfig, load_config,
                                parse_override)
from emotion_ray.errors import EmotionRayError

# (flag, config key, argparse kwargs); the key is where the value lands in the stage's config.
Flag = tuple[str, str, dict[str, Any]]

PREPARE_FLAGS: list[Flag] = [
    ("--input", "inputs", {"nargs": "+", "help": "image roots: <root>/<label>/**/<file>, local or s3://"}),
    ("--output", "output", {"help": "dataset folder or s3:// prefix"}),
    ("--classes", "classes", {"type": lambda s: s.split(","), "help": "comma-separated classes to keep, in order"}),
    ("--image-size", "image_size", {"type": int}),
    ("--faces", "faces.mode", {"choices": ["none", "largest", "all"], "help": "crop faces (default none: whole "
                               "images)"}),
    ("--overwrite", "overwrite", {"action": "store_const", "const": True}),
    ("--s3-endpoint-url", "storage.s3_endpoint_url", {}),
]
TRAIN_FLAGS: list[Flag] = [
    ("--data", "data", {"help": "prepared dataset, or an image folder to prepare on the fly"}),
    ("--output", "output", {"help": "folder or s3:// prefix for run directories"}),
    ("--run-name", "run_name", {}),
    ("--resume", "resume", {"action": "store_const", "const": True, "help": "continue --run-name from its checkpoint"}),
    ("--workers", "workers", {"type": int}),
    ("--use-gpu", "use_gpu", {"action": "store_const", "const": True}),
    ("--epochs", "epochs", {"type": int}),
    ("--batch-size", "batch_size", {"type": int, "help": "global batch size"}),
    ("--learning-rate", "learning_rate", {"type": float}),
    ("--image-size", "image_size", {"type": int, "help": "only when --data is an image folder"}),
    ("--architecture", "model.architecture", {}),
    ("--max-failures", "max_failures", {"type": int}),
    ("--tracking-uri", "mlflow.tracking_uri", {}),
    ("--no-mlflow", "mlflow.enabled", {"action": "store_const", "const": False}),
    ("--s3-endpoint-url", "storage.s3_endpoint_url", {}),
]
EVALUATE_FLAGS: list[Flag] = [
    ("--folds", "folds", {"type": int, "help": "K: trainings, each holding out one fold of whole groups (default 5)"}),
    ("--pool", "pool", {"choices": ["all", "train_val"], "help": "rows dealt into folds: all labelled rows "
                        "(default), or train+val leaving the test split untouched"}),
    ("--max-concurrent-trials", "max_concurrent_trials", {"type": int, "help": "folds trained at once (default: "
                                                          "as many as the cluster fits)"}),
    ("--overwrite", "overwrite", {"action": "store_const", "const": True,
                                  "help": "replace an earlier cross-validation in --output"}),
    ("--data", "data", {"help": "a prepared dataset (emotion-ray prepare)"}),
    ("--output", "output", {"help": "folder (or s3:// prefix) for this cross-validation"}),
    *[f for f in TRAIN_FLAGS if f[0] not in ("--data", "--output", "--run-name", "--resume", "--image-size")],
    ("--run-name", "run_name", {"help": "the MLflow parent run's name (default cv_<output folder's name>)"}),
]
MIN_CONFIDENCE_HELP = "0..1: label rows whose top probability is below it `uncertain` (default off)"
SCORE_FLAGS: list[Flag] = [
    ("--model", "model", {"help": "run dir, .keras file, or models:/name/version"}),
    ("--input", "inputs", {"nargs": "+", "help": "folders, s3:// prefixes, .zip/.tar archives, or .txt files of paths"}),
    ("--output", "output", {"help": "Parquet folder or s3:// prefix"}),
    ("--batch-size", "batch_size", {"type": int}),
    ("--num-predictors", "num_predictors", {"type": int}),
    ("--use-gpu", "use_gpu", {"action": "store_const", "const": True}),
    ("--overwrite", "overwrite", {"action": "store_const", "const": True,
                                  "help": "delete the predictions already in --output and score everything again"}),
    ("--no-retry-errors", "retry_errors", {"action": "store_const", "const": False,
                                           "help": "keep earlier unreadable rows on a re-run"}),
    ("--tracking-uri", "mlflow_tracking_uri", {}),
    ("--faces", "faces.mode", {"choices": ["none", "largest", "all"], "help": "all: a row per face; default: as "
                               "the model was trained"}),
    ("--min-confidence", "min_confidence", {"type": float, "help": MIN_CONFIDENCE_HELP}),
    ("--s3-endpoint-url", "storage.s3_endpoint_url", {}),
]
PREDICT_FLAGS: list[Flag] = [
    ("--model", "model", {"help": "run dir, .keras file, or models:/name/version"}),
    ("--batch-size", "batch_size", {"type": int, "help": "as score's, for the same padded batches"}),
    ("--tracking-uri", "mlflow_tracking_uri", {}),
    ("--faces", "faces.mode", {"choices": ["none", "largest", "all"], "help": "default: as the model was trained"}),
    ("--min-confidence", "min_confidence", {"type": float, "help": MIN_CONFIDENCE_HELP}),
    ("--s3-endpoint-url", "storage.s3_endpoint_url", {}),
    ("--annotate", "annotate", {"metavar": "FOLDER", "help": "write each picture with its faces boxed and "
                                "labelled into FOLDER, at its path relative to the pictures' common folder: "
                                "a/x.jpg -> FOLDER/a/x.annotated.jpg (a JPEG stays JPEG, other formats become "
                                ".png; pictures that would share a name add 8 hex digits of their path's hash). "
                                "FOLDER must be empty or an earlier predict's"}),
    ("--overwrite", "overwrite", {"action": "store_const", "const": True,
                                  "help": "replace the pictures an earlier predict --annotate wrote in FOLDER"}),
]


def _add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    parser.add_argument("--config", help="YAML file with any of this stage's config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    for flag, key, kwargs in flags:
        parser.add_argument(flag, dest=key, default=None, **kwargs)
    _add_screen_flags(parser)


def _add_screen_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="show Ray's and TensorFlow's messages here instead "
                        "of in the log file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON (on stdout)")


def _report(args: argparse.Namespace, result: Any, human: Callable[[Any], str]) -> None:
    """The stage's summary on the terminal's stdout: JSON with --json, else for a person."""
    print(json.dumps(result, indent=2, default=str) if args.json else human(result), file=console.out())


def _config_from_args(model, args: argparse.Namespace, flags: list[Flag], positional: tuple[str, ...] = ()):
    overrides = dict(parse_override(item) for item in args.set)
    keys = [key for _, key, _ in flags] + list(positional)
    overrides.update({key: getattr(args, key) for key in keys if getattr(args, key) is not None})
    return load_config(model, args.config, overrides)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from emotion_ray.demo import make_demo_dataset

    counts = make_demo_dataset(args.out, per_class=args.per_class, seed=args.seed, canvas=args.canvas)
    print(f"wrote {sum(counts.values())} demo images to {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = _config_from_args(PrepareConfig, args, PREPARE_FLAGS)
    from emotion_ray.prepare import prepare

    manifest = prepare(cfg)
    _report(args, {"output": cfg.output, **manifest}, lambda m: format_prepare_summary(cfg.output, m))
    return 0


def format_prepare_summary(output: str, m: dict[str, Any]) -> str:
    lines = [f"prepared dataset: {output}", f"  files found {m['files_found']}: rows {m['rows']}, "
             f"rejects {m['rejects']['count']}, ignored {m['ignored']['count']}"]
    for split, per_class in m["counts"].items():
        lines.append(f"  {split:5s} {sum(per_class.values()):6d}  " + "  ".join(f"{c}={n}" for c, n in per_class.items()))
    if m["duplicates"]["duplicate_rows"]:
        lines.append(f"  exact duplicates: {m['duplicates']['duplicate_rows']} rows in {m['duplicates']['groups']} groups")
    g = m.get("groups", {})
    if "groups" in g:
        lines.append(f"  groups: {g['groups']} ({g['groups_of_several_pictures']} of several pictures, largest "
                     f"{g['largest_group_pictures']}), near-duplicate pairs {g['near_duplicate_pairs']}; "
                     f"{g['groups_straddling_hash_split']} would have straddled a plain hash split")
        if g["groups_across_splits"]:
            lines.append(f"  warning: {g['groups_across_splits']} groups cross the given splits (near-duplicates or "
                         "one group key in two of train/val/test): test figures may measure memory")
    for kind, listed_in in (("rejects", "rejects.parquet"), ("ignored", m["ignored"].get("listed_in"))):
        if m[kind]["by_reason"]:
            lines.append(f"  {kind} by reason: {m[kind]['by_reason']}" + (f" (paths: {listed_in})" if listed_in else ""))
    if m.get("faces"):
        lines.append(f"  pictures by faces found ({m['faces']['detector']}, {m['faces']['mode']}): "
                     f"{m['faces']['pictures_by_faces']}")
    if m.get("small_classes"):
        lines.append(f"  warning: few images in {m['small_classes']}: test figures for them will be noise")
    lines.append(f"  use with     emotion-ray train --data {output}  (or pandas.read_parquet(\"{output}/data/split=train\"))")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(TrainConfig, args, TRAIN_FLAGS)
    from emotion_ray.train import run_training

    result = run_training(cfg)
    _report(args, result, lambda r: summary.train_text(r, cfg))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _config_from_args(CrossValidationConfig, args, EVALUATE_FLAGS)
    from emotion_ray.crossval import run_cross_validation

    _report(args, run_cross_validation(cfg), lambda r: summary.cv_text(r, cfg))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    cfg = _config_from_args(ScoreConfig, args, SCORE_FLAGS)
    from emotion_ray.score import score

    _report(args, score(cfg), summary.score_text)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    cfg = _config_from_args(PredictConfig, args, PREDICT_FLAGS, positional=("inputs",))
    from emotion_ray.annotate import Annotations
    from emotion_ray.inference import predict

    with contextlib.ExitStack() as stack:
        # Claimed before the model loads: a folder that is not ours stops the run at once.
        annotations = (stack.enter_context(Annotations(cfg.annotate, cfg.inputs, cfg.storage, cfg.decode_limits(),
                                                       cfg.overwrite)) if cfg.annotate else None)
        results = predict(cfg)
        _print_predictions(args, cfg, results)
        drawn = annotations.write(results) if annotations else []
    for d in drawn:
        print(f"annotated: {d['annotated']}" if d["annotated"] else f"not annotated: {d['path']}: ERROR {d['error']}",
              file=console.err())
    return 0 if all(r["error"] is None for r in [*results, *drawn]) else 1


def _print_predictions(args: argparse.Namespace, cfg: PredictConfig, results: list[dict[str, Any]]) -> None:
    out = console.out()
    if args.json:
        print(json.dumps(results, indent=2), file=out)
    else:
        for r in results:
            where = f"{r['path']} face {r['face']['index']} at {r['face']['box']}" if r.get("face") else r["path"]
            if r["error"]:
                print(f"{where}: ERROR {r['error']}", file=out)
            else:
                probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
                print(f"{where}: {r['label']} ({r['confidence']:.3f})  {probs}", file=out)
    if cfg.min_confidence is not None:
        unsure = sum(r["label"] == UNCERTAIN for r in results)
        print(f"{unsure} of {len(results)} rows {UNCERTAIN} (top probability below {cfg.min_confidence:g})",
              file=console.err() if args.json else out)


def cmd_tune(args: argparse.Namespace) -> int:
    from emotion_ray.tune import run_tuning

    overrides = dict(parse_override(item) for item in args.set)
    _report(args, run_tuning(args.config, overrides), summary.tune_text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotion-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="draw deterministic synthetic faces (angry/happy/sad)")
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--canvas", type=int, default=256, help="pixel size of the drawn images")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("prepare", help="images -> leak-free sharded Parquet dataset")
    _add_flags(p, PREPARE_FLAGS)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train with TensorflowTrainer + MultiWorkerMirroredStrategy")
    _add_flags(p, TRAIN_FLAGS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search from tune_configs/*.yaml")
    p.add_argument("--config", required=True, help="e.g. tune_configs/smoke.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any key of the YAML")
    _add_screen_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="group k-fold cross-validation of a train config (--folds K)")
    _add_flags(p, EVALUATE_FLAGS)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="batch inference over folders/prefixes/archives -> Parquet")
    _add_flags(p, SCORE_FLAGS)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("predict", help="predict a few images (same code path as score)")
    p.add_argument("inputs", nargs="+", metavar="IMAGE")
    _add_flags(p, PREDICT_FLAGS)
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    from emotion_ray.runtime import setup_process

    setup_process()  # before anything imports TensorFlow
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        if not hasattr(args, "verbose"):  # demo-data: no Ray, nothing to quieten
            return handler(args)
        with console.session(args.command, verbose=args.verbose):
            return handler(args)
    except EmotionRayError as exc:
        print(f"emotion-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # a bug: its traceback, and where the rest of the story is
        traceback.print_exc()
        log = console.last_log()
        print(f"emotion-ray {args.command}: failed unexpectedly" + (f"; Ray's and TensorFlow's messages are in {log}"
                                                                   if log else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
