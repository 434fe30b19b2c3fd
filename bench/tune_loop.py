"""Tune loop (issue 30): the smoke search and a 3-fold `evaluate`, N times in a row, as a user runs them.

Each command is `emotion-ray tune|evaluate` in its own process, so each starts its own Ray, as on a
user's machine; an idle second Ray runs beside them (issue 30 hung only beside another Ray;
`--alone` leaves it out). Per round it records each command's exit status, wall seconds, and how many trials (folds)
finished or failed; a command that outlives `--hang-seconds` is counted as hung, interrupted
(SIGINT: the CLI stops the Ray it started) and the loop goes on. `--face-recipe` adds the face
recipe's search (tune_configs/face_recipe_overnight.yaml on CPU, face_cnn only: the backbones'
ImageNet weights need a download) to each round.

    python -m bench.tune_loop [--rounds 10] [--per-class 40] [--folds 3] [--face-recipe] [--alone]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bench.common import WORK, demo_files, record

ROOT = Path(__file__).resolve().parents[1]


def prepared(per_class: int, image_size: int) -> Path:
    """Demo faces prepared once (cached under BENCH_DIR)."""
    out = WORK / f"tune_loop_ds_{per_class}_{image_size}"
    if not (out / "manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        images = demo_files("tune_loop", per_class=per_class, canvas=96)
        subprocess.run([sys.executable, "-m", "emotion_ray.cli", "prepare", "--input", str(images), "--output",
                        str(out), "--image-size", str(image_size)], check=True, cwd=ROOT)
    return out


def another_ray() -> subprocess.Popen:
    """An idle second Ray instance on this machine for the loop's duration (1 CPU, no dashboard), as
    on the machine where issue 30 hung: Ray Train's placement group cleaner then found two Rays."""
    code = ("import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False, logging_level='ERROR'); "
            "print('up', flush=True); sys.stdin.read(); ray.shutdown()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up", "the second Ray did not start"
    return proc


def run(argv: list[str], hang_seconds: float, log: Path) -> dict:
    """One CLI command: its exit status (None: hung and interrupted) and wall seconds."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "emotion_ray.cli", *argv], cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=hang_seconds)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
        except KeyboardInterrupt:  # the loop is stopped: so is the command, and its Ray with it
            stop(proc)
            raise
    return {"rc": rc, "hung": rc is None, "wall_s": round(time.perf_counter() - started, 1)}


def stop(proc: subprocess.Popen) -> None:
    """Interrupt a CLI command (SIGINT: it stops the Ray it started), killing it if it lingers."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def trial_counts(trials_csv: Path) -> dict:
    if not trials_csv.exists():
        return {"trials": 0, "finished": 0, "failed": 0}
    table = pd.read_csv(trials_csv)
    return {"trials": len(table), "finished": int((table["status"] == "TERMINATED").sum()),
            "failed": int((table["status"] == "ERROR").sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=40, help="demo faces per class (40: the issue's 120)")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--face-recipe", action="store_true", help="also run the face recipe's search each round")
    parser.add_argument("--hang-seconds", type=float, default=1200, help="a command running longer counts as hung")
    parser.add_argument("--alone", action="store_true", help="no second Ray beside the commands' own")
    args = parser.parse_args()
    # A shell starts a background job with SIGINT ignored, and children inherit that: restore it, so
    # an interrupted loop still records what ran and stop() can interrupt a command (and its Ray).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    data = prepared(args.per_class, args.image_size)
    out = WORK / "tune_loop_runs"
    shutil.rmtree(out, ignore_errors=True)
    rounds: list[dict] = []
    beside = None if args.alone else another_ray()
    try:
        loop(args, data, out, rounds)
    except KeyboardInterrupt:  # stopped early: what ran is still recorded, and says so
        print(f"interrupted after {len(rounds)} round(s)", flush=True)
    finally:
        if beside is not None:
            beside.stdin.close()  # it shuts its Ray down and exits
            beside.wait(timeout=120)
    record("tune_loop", {"rounds_asked": args.rounds, "rounds": len(rounds),
                         "rounds_every_trial_finished": sum(r["every_trial_finished"] for r in rounds),
                         "hung": sum(r[n]["hung"] for r in rounds for n in r if isinstance(r[n], dict)),
                         "per_class": args.per_class, "image_size": args.image_size, "folds": args.folds,
                         "face_recipe": args.face_recipe, "another_ray_beside": beside is not None,
                         "per_round": rounds})


def face_recipe_config(where: Path) -> Path:
    """tune_configs/face_recipe_overnight.yaml with face_cnn only (the backbones' ImageNet weights
    need a download), written beside the round: its search space's keys are dotted paths
    (`model.architecture`), which `--set` would read as nested keys."""
    import yaml

    cfg = yaml.safe_load((ROOT / "tune_configs" / "face_recipe_overnight.yaml").read_text())
    cfg["space"]["model.architecture"] = {"choice": ["face_cnn"]}
    cfg["space"]["model.freeze_epochs"] = {"choice": [0]}
    path = where / "face_recipe_overnight.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def loop(args, data: Path, out: Path, rounds: list[dict]) -> None:
    """Run the rounds, appending each one's result to `rounds` as it ends."""
    for i in range(args.rounds):
        where = out / f"round_{i}"
        where.mkdir(parents=True)
        commands = {
            "smoke": (["tune", "--config", str(ROOT / "tune_configs" / "smoke.yaml"), "--set", f"data={data}",
                       "--set", f"output={where}", "--set", "mlflow.enabled=false"], where / "smoke" / "trials.csv"),
            "evaluate": (["evaluate", "--data", str(data), "--output", str(where / "cv"), "--folds", str(args.folds),
                          "--epochs", "2", "--batch-size", "16", "--no-mlflow"], None),
        }
        if args.face_recipe:
            commands["face_recipe"] = (
                ["tune", "--config", str(face_recipe_config(where)), "--set", f"data={data}",
                 "--set", f"output={where}", "--set", "trial.use_gpu=false", "--set", "num_samples=3",
                 "--set", "base.epochs=2", "--set", "base.batch_size=16", "--set", "scheduler.grace_period=1",
                 "--set", "mlflow.enabled=false"],
                where / "face_recipe_overnight" / "trials.csv")
        result: dict = {"round": i}
        for name, (argv, trials_csv) in commands.items():
            outcome = run(argv, args.hang_seconds, where / f"{name}.log")
            if trials_csv is not None:
                outcome.update(trial_counts(trials_csv))
            else:
                cv = where / "cv" / "cv.json"
                done = len(json.loads(cv.read_text())["per_fold"]) if cv.exists() else 0
                outcome.update(trials=args.folds, finished=done, failed=args.folds - done)
            outcome["every_trial_finished"] = outcome["rc"] == 0 and outcome["failed"] == 0 and \
                outcome["finished"] == outcome["trials"] > 0
            result[name] = outcome
        result["every_trial_finished"] = all(result[name]["every_trial_finished"] for name in commands)
        rounds.append(result)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
