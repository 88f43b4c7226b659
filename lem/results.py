"""Summarise finished runs: python -m lem.results [DIR ...]

Finds every summary.json under the given folders (default: every experiment's results/),
groups the runs that differ only by seed, and prints experiment, model, number of seeds,
the test metric (at the best validation point) as mean ± std, and the paper's figure.
"""
import argparse
import json
import statistics
from pathlib import Path

from .runlog import REPO_ROOT

NOT_HYPERPARAMETERS = {"seed", "seeds", "run_name", "resume", "device", "data_dir", "out_dir", "max_time"}


def load_runs(folders):
    runs = []
    for folder in folders:
        for summary_file in sorted(Path(folder).rglob("summary.json")):
            config_file = summary_file.with_name("config.json")
            summary = json.loads(summary_file.read_text())
            config = json.loads(config_file.read_text()) if config_file.exists() else {"args": {}}
            runs.append({"folder": summary_file.parent, "summary": summary, "args": config.get("args", {})})
    return runs


def group_key(run):
    hyper = {k: v for k, v in run["args"].items() if k not in NOT_HYPERPARAMETERS}
    return run["summary"]["experiment"], json.dumps(hyper, sort_keys=True)


def summarise(runs):
    """One row per group of runs that differ only by seed."""
    groups = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    rows = []
    for (experiment, _), members in sorted(groups.items()):
        first = members[0]
        values = [m["summary"]["test"] for m in members if m["summary"].get("test") is not None]
        statuses = sorted({m["summary"]["status"] for m in members})
        rows.append({
            "experiment": experiment, "model": first["summary"]["model"], "nhid": first["args"].get("nhid"),
            "metric": first["summary"]["metric"], "seeds": len(members), "n_values": len(values),
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            "paper": first["summary"].get("paper"), "status": ",".join(statuses),
        })
    return rows


def format_value(mean, std):
    if mean is None:
        return "-"
    return f"{mean:.4g} ± {std:.2g}"


def format_table(rows):
    header = ["experiment", "model", "nhid", "seeds", "metric", "test (mean ± std)", "paper", "status"]
    body = [[r["experiment"], r["model"], str(r["nhid"]), str(r["seeds"]), r["metric"],
             format_value(r["mean"], r["std"]), str(r["paper"]), r["status"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="folders to search for runs (default: <repo>/*/results)")
    args = p.parse_args(argv)
    folders = args.dirs or sorted(REPO_ROOT.glob("*/results"))
    rows = summarise(load_runs(folders))
    print(format_table(rows) if rows else "no runs found under " + ", ".join(map(str, folders)))


if __name__ == "__main__":
    main()
