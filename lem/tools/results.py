"""Summarise runs: python -m lem.tools.results [DIR ...] [--markdown] [--plot FILE]

Finds every summary.json under the given folders (default: every experiment's results/),
groups the runs that differ only by seed, and prints experiment, model, number of seeds,
the test metric (at the best validation point) as mean ± std, and the paper's figure.
--markdown prints the table in Markdown; --plot FILE draws every run's learning curve.
Runs of a tuned configuration (python -m lem.tools.tune --seeds, docs/tuning.md) get their own
rows, marked in a "tuned" column; the trials of a study are left out unless --trials.
"""
import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from .. import checkout
from ..train.cli import RUN_ONLY_FLAGS

NOT_HYPERPARAMETERS = RUN_ONLY_FLAGS | {"seed"}  # runs that differ only in these are one setting


SUMMARY_KEYS = ("experiment", "model", "metric", "status", "test")


LATER_FLAGS = {"amp": "none"}  # flags added after some records were written: what those runs had


def load_runs(folders):
    """Every run under folders; one whose summary.json or config.json does not parse (or lacks what
    a table needs) is skipped with one line naming the file."""
    runs = []
    for folder in folders:
        for summary_file in sorted(Path(folder).rglob("summary.json")):
            try:
                runs.append(read_record(summary_file))
            except ValueError as e:
                print(f"skipping {summary_file.parent}: {e}", file=sys.stderr)
    return runs


def read_record(summary_file):
    """One run of load_runs; a ValueError naming the damaged file."""
    config_file = summary_file.with_name("config.json")
    summary = read_json(summary_file)
    config = read_json(config_file) if config_file.exists() else {"args": {}}
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing or not isinstance(config, dict) or not isinstance(config.get("args", {}), dict):
        damaged = summary_file if missing else config_file
        raise ValueError(f"{damaged.name} is not a whole record" + (f" (it lacks {', '.join(missing)})" if missing else ""))
    return {"folder": summary_file.parent, "summary": summary, "args": {**LATER_FLAGS, **config.get("args", {})}}


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{Path(path).name} does not parse ({type(e).__name__}: {str(e)[:120]})") from None


def group_key(run):
    hyper = {k: v for k, v in run["args"].items() if k not in NOT_HYPERPARAMETERS}
    return run["summary"]["experiment"], json.dumps(hyper, sort_keys=True)


def tuned_by(run):
    """The study whose best configuration the run re-runs (its tuned.json), e.g. "fitzhugh_nagumo-lem,
    trial 7 of 20"; None for a run of given settings."""
    file = Path(run["folder"]) / "tuned.json"
    if not file.exists():
        return None
    tuned = json.loads(file.read_text())
    return f"{tuned['study']}, trial {tuned['trial']} of {tuned['trials']}"


def is_trial(run):
    """A trial of a tuning study: <study folder>/trial_<n> beside the study's study.json."""
    folder = Path(run["folder"])
    return re.fullmatch(r"trial_\d+", folder.name) is not None and (folder.parent / "study.json").exists()


def summarise(runs, trials=False):
    """One row per group of runs that differ only by seed (and run-only flags such as the backend);
    tuned runs apart from the others; the trials of tuning studies only when trials is on."""
    runs = [run for run in runs if trials or not is_trial(run)]
    groups = {}
    for run in runs:
        experiment, hyper = group_key(run)
        groups.setdefault((experiment, json.dumps([hyper, tuned_by(run)])), []).append(run)
    rows = []
    def order(group):  # by experiment, model, then given settings before tuned ones
        (experiment, key), members = group
        return experiment, model_order(members[0]), tuned_by(members[0]) is not None, natural(key)
    for (experiment, _), members in sorted(groups.items(), key=order):
        first = members[0]
        values = [m["summary"]["test"] for m in members if m["summary"].get("test") is not None]
        statuses = sorted({m["summary"]["status"] for m in members})
        rows.append({
            "experiment": experiment, "model": first["summary"]["model"], "nhid": first["args"].get("nhid"),
            "setting": distinct_setting(first, [r for r in runs if r["summary"]["experiment"] == experiment]),
            "metric": first["summary"]["metric"], "seeds": len(members), "n_values": len(values),
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            "paper": first["summary"].get("paper"), "status": ",".join(statuses),
            "wall_time_s": statistics.fmean(m["summary"].get("wall_time_s") or 0.0 for m in members),
            "tuned": tuned_by(first),
        })
    return rows


def natural(text):
    """Sort key that orders the numbers inside text by value (200 before 2000 before 10000)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def model_order(run):
    """LEM first, then the paper's baselines in the paper's order."""
    order = ["lem", "lstm", "gru"]
    model = run["summary"]["model"]
    return (order.index(model) if model in order else len(order), model)


def distinct_setting(run, experiment_runs):
    """The hyper-parameters (beyond model and nhid) in which this run's setting differs from other
    runs of the same experiment, e.g. "seq_length=2000 max_iter=10000"; "" when none do."""
    varying = set()
    for other in experiment_runs:
        for k in set(run["args"]) | set(other["args"]):
            if k not in NOT_HYPERPARAMETERS | {"model", "nhid"} and run["args"].get(k) != other["args"].get(k):
                varying.add(k)
    return " ".join(f"{k}={format_setting(run['args'].get(k))}" for k in sorted(varying))


def format_setting(value):
    """A flag's value as the setting column shows it: a searched float to 4 digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_value(mean, std):
    if mean is None:
        return "-"
    return f"{mean:.4g} ± {std:.2g}"


def format_duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def table_cells(rows):
    header = ["experiment", "model", "nhid", "setting", "seeds", "metric", "test (mean ± std)", "paper",
              "wall time (mean)", "status"]
    body = [[r["experiment"], r["model"], str(r["nhid"]), r["setting"] or "-", str(r["seeds"]), r["metric"],
             format_value(r["mean"], r["std"]), "-" if r["paper"] is None else str(r["paper"]),
             format_duration(r["wall_time_s"]), r["status"]] for r in rows]
    if any(r.get("tuned") for r in rows):  # the column appears once a tuned run is among the rows
        header.insert(4, "tuned")
        for cells, r in zip(body, rows):
            cells.insert(4, r.get("tuned") or "-")
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
    """The records of a run's log.jsonl; a damaged one ends the curve there, with one line saying so."""
    path = Path(folder) / "log.jsonl"
    records = []
    for n, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}: line {n} does not parse; the curve ends at line {n - 1}", file=sys.stderr)
            break
    return records


MODEL_COLOURS = {"lem": "C0", "lstm": "C1", "gru": "C2"}


def plot(runs, path, x_axis="epoch"):
    """Learning curves, one panel per experiment: the selection metric on validation (test where
    a task has no validation split) against epoch or step, one line per run coloured by model; the
    paper's figures dashed in the model's colour, a trivial predictor's baseline dotted. Error
    metrics get a log axis. Returns the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = sorted({run["summary"]["experiment"] for run in runs})
    fig, axes = plt.subplots(1, len(experiments), figsize=(6 * len(experiments), 4), squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        members = sorted((run for run in runs if run["summary"]["experiment"] == experiment), key=model_order)
        first = members[0]["summary"]
        metric, split = first["metric"], "test"
        references = {}  # (label, value) -> (colour, linestyle)
        for run in members:
            log = read_log(run["folder"])
            split = "valid" if log and "valid" in log[0] else "test"
            model = run["summary"]["model"]
            ax.plot([r[x_axis] for r in log], [r[split][metric] for r in log], label=run["folder"].name,
                    color=MODEL_COLOURS.get(model), linewidth=1)
            for value in paper_values(run["summary"].get("paper")):
                references[(f"paper, {model}: {value:g}", value)] = (MODEL_COLOURS.get(model, "black"), "--")
            if run["summary"].get("baseline") is not None:
                baseline = run["summary"]["baseline"]
                references[(f"baseline: {baseline:g}", baseline)] = ("black", ":")
        for (label, value), (colour, style) in references.items():
            ax.axhline(value, linestyle=style, color=colour, linewidth=1, label=label)
        if not first["higher_is_better"] and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.set(title=experiment, xlabel=x_axis, ylabel=f"{split} {metric}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lem.tools.results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", help="folders to search for runs (default: <checkout>/*/results)")
    p.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    p.add_argument("--plot", metavar="FILE", help="save the learning curves of the runs found to FILE (.png, .pdf, .svg)")
    p.add_argument("--trials", action="store_true", help="list the trials of tuning studies too (docs/tuning.md)")
    p.add_argument("--x-axis", dest="x_axis", choices=["epoch", "step"], default="epoch", help="x axis of --plot")
    args = p.parse_args(argv)
    if args.dirs:
        folders = args.dirs
        missing = [folder for folder in folders if not Path(folder).is_dir()]
        if missing:
            p.exit(2, f"{p.prog}: no such folder: {', '.join(map(str, missing))}\n")
    else:
        try:
            folders = sorted(checkout.required_root().glob("*/results"))
        except checkout.NotACheckout as e:
            p.exit(2, f"{p.prog}: {e}, or name the folders of runs to read\n")
    runs = load_runs(folders)
    if not runs:
        print("no runs found under " + (", ".join(map(str, folders)) or "<checkout>/*/results: no experiment has run yet"))
        return
    rows = summarise(runs, args.trials)
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.plot:
        plot(runs, args.plot, args.x_axis)
        print(f"learning curves of {len(runs)} runs: {args.plot}")


if __name__ == "__main__":
    main()
