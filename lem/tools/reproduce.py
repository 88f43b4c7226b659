"""Re-run a recorded run and check it gives the recorded figures:

    python -m lem.tools.reproduce docs/runs/fitzhugh_nagumo/lem_h16_seed1234            # the whole run
    python -m lem.tools.reproduce docs/runs/fitzhugh_nagumo/lem_h16_seed1234 --epochs 3 # its first 3 epochs

Runs the command recorded in the run's config.json ("rerun": its train.py with every
hyper-parameter, the seed and the backend) on the recorded device with as many torch threads,
into a temporary folder, and compares every evaluation record, metric by metric, with the
recorded log.jsonl. Exact equality is expected on the same kind of machine (same CPU features,
same library versions); exit status 1 lists the records that differ.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import checkout


def read_records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def metrics(record):
    """The evaluation figures of one log record: {split: {metric: value}}, without timings."""
    return {k: v for k, v in record.items() if isinstance(v, dict)}


def rerun(run_dir, epochs=None, data_dir=None):
    """Run the recorded command again (data from data_dir if given, else the recorded folder);
    returns the new run's log records."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    argv = list(config["rerun"])
    if epochs is not None:
        if "--epochs" not in argv:
            raise SystemExit(f"{run_dir}: this experiment counts iterations, not epochs; re-run it whole")
        argv[argv.index("--epochs") + 1] = str(epochs)
    root = checkout.required_root()
    data_dir = data_dir or root / config["args"]["data_dir"]  # recorded relative to the checkout, or absolute
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(root / argv[0]), *argv[1:], "--device", config["device"],
                   "--data-dir", str(data_dir), "--out-dir", out, "--run-name", "rerun"]
        env = dict(os.environ, OMP_NUM_THREADS=str(config.get("torch_threads", 1)))
        print("running:", " ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=root, env=env).returncode != 0:
            raise SystemExit(f"the re-run of {run_dir} failed (its output is above)")
        return read_records(Path(out) / "rerun")


def differences(recorded, repeated):
    """Lines naming every epoch whose figures differ (and missing or extra epochs)."""
    lines = []
    for old, new in zip(recorded, repeated):
        if metrics(old) != metrics(new):
            lines.append(f"epoch {old['epoch']}: recorded {metrics(old)}, now {metrics(new)}")
    if len(repeated) > len(recorded):
        lines.append(f"the re-run has {len(repeated)} records, the run {len(recorded)}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lem.tools.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run folder holding config.json and log.jsonl")
    p.add_argument("--epochs", type=int, default=None, help="re-run and compare only the first N epochs")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="default: the folder the run recorded")
    args = p.parse_args(argv)
    try:
        checkout.required_root()  # outside a checkout no recorded command can run: say that first
        recorded = read_records(args.run_dir)
        repeated = rerun(args.run_dir, args.epochs, args.data_dir)
    except (OSError, ValueError, KeyError, checkout.NotACheckout) as e:
        p.exit(2, f"{p.prog}: cannot re-run {args.run_dir}: {e}\n")
    if len(repeated) < (args.epochs or len(recorded)):
        sys.exit(f"the re-run stopped after {len(repeated)} records")
    wrong = differences(recorded, repeated)
    if wrong:
        sys.exit("the re-run differs from the record:\n" + "\n".join(wrong))
    print(f"reproduced: {len(repeated)} evaluation records of {args.run_dir} equal the recorded ones")


if __name__ == "__main__":
    main()
