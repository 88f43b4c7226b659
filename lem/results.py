"""Summarise runs: python -m lem.results [DIR ...] [--markdown] [--plot FILE]

Finds every summary.json under the given folders (default: every experiment's results/),
groups the runs that differ only by seed, and prints experiment, model, number of seeds,
the test metric (at the best validation point) as mean ± std, and the paper's figure.
--markdown prints the table in Markdown; --plot FILE draws every run's learning curve.
"""
import argparse
import json
import re
import statistics
from pathlib import Path

from .harness import RUN_ONLY_FLAGS
from .runlog import REPO_ROOT

NOT_HYPERPARAMETERS = RUN_ONLY_FLAGS | {"seed"}  # runs that differ only in these are one setting


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


def table_cells(rows):
    header = ["experiment", "model", "nhid", "seeds", "metric", "test (mean ± std)", "paper", "status"]
    body = [[r["experiment"], r["model"], str(r["nhid"]), str(r["seeds"]), r["metric"],
             format_value(r["mean"], r["std"]), str(r["paper"]), r["status"]] for r in rows]
    return header, body


def format_table(rows):
    header, body = table_cells(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows):
    header, body = table_cells(rows)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *body])


def paper_values(paper):
    """The paper's figure as numbers to draw: 0.002 -> [0.002]; "1e-4 ... 1e-5" -> [1e-4, 1e-5]."""
    if isinstance(paper, (int, float)):
        return [float(paper)]
    return [float(x) for x in re.findall(r"\d+(?:\.\d*)?(?:e[-+]?\d+)?", paper or "")]


def read_log(folder):
    lines = (Path(folder) / "log.jsonl").read_text().splitlines() if (Path(folder) / "log.jsonl").exists() else []
    return [json.loads(line) for line in lines]


def plot(runs, path, x_axis="epoch"):
    """Learning curves, one panel per experiment: the selection metric on validation (test where
    a task has no validation split) against epoch or step, one line per run, the paper's figure dashed.
    Error metrics get a log axis. Returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = sorted({run["summary"]["experiment"] for run in runs})
    fig, axes = plt.subplots(1, len(experiments), figsize=(6 * len(experiments), 4), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        members = [run for run in runs if run["summary"]["experiment"] == experiment]
        first = members[0]["summary"]
        metric, split = first["metric"], "test"
        for run in members:
            log = read_log(run["folder"])
            split = "valid" if log and "valid" in log[0] else "test"
            ax.plot([r[x_axis] for r in log], [r[split][metric] for r in log], label=run["folder"].name)
        for value in paper_values(first.get("paper")):
            ax.axhline(value, linestyle="--", color="black", linewidth=1, label=f"paper: {value:g}")
        if not first["higher_is_better"] and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set(title=experiment, xlabel=x_axis, ylabel=f"{split} {metric}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="folders to search for runs (default: <repo>/*/results)")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--plot", metavar="FILE", help="save the learning curves of the runs found to FILE (.png, .pdf, .svg)")
    p.add_argument("--x-axis", dest="x_axis", choices=["epoch", "step"], default="epoch", help="x axis of --plot")
    args = p.parse_args(argv)
    folders = args.dirs or sorted(REPO_ROOT.glob("*/results"))
    runs = load_runs(folders)
    if not runs:
        print("no runs found under " + ", ".join(map(str, folders)))
        return
    rows = summarise(runs)
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.plot:
        plot(runs, args.plot, args.x_axis)
        print(f"learning curves of {len(runs)} runs: {args.plot}")


if __name__ == "__main__":
    main()
