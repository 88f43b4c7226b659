"""Shared test utilities: run an experiment's train.py as a user would, read its run folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout under test


def train_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_train(experiment, *args, out_dir, data_dir, check=True, timeout=600, env=None):
    """python <experiment>/train.py ARGS --out-dir OUT --data-dir DATA; returns the finished process."""
    cmd = [sys.executable, str(REPO / experiment / "train.py"), *map(str, args),
           "--out-dir", str(out_dir), "--data-dir", str(data_dir), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or train_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_run(run_dir):
    """The files a run folder holds: summary, config and the parsed log.jsonl records."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return summary, config, log
