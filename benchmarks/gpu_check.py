"""The GPU check in one command (docs/kernels.md), for a machine with a CUDA GPU and torch and Triton
installed (nothing is installed: it may reach no package registry), from anywhere:

    ${PYTHON:-python3} -u benchmarks/gpu_check.py          # or: bash benchmarks/gpu_check.sh
    ${PYTHON:-python3} -u benchmarks/gpu_check.py --dry-run  # the same steps on CPU under TRITON_INTERPRET=1, tiny

Steps, each in its own process under its own time limit; one that fails or runs out of time is
recorded and the next one runs all the same:
    nvidia-smi   the GPU, its driver
    python       torch and Triton versions, the GPU torch sees, the packages the steps need
    tests        the GPU tests (tests/kernels/test_gpu_tiers.py on CUDA)
    bench        python -m lem.tools.bench kernels --devices cuda (every configuration and GPU tier,
                 stepwise with and without CUDA graphs, cuDNN's LSTM at its default TF32 and in strict fp32)
    fhn          three epochs of fitzhugh_nagumo/train.py on CUDA (needs scipy: said so if absent)

Writes to $OUT (else gpu_check_out/), flat, as it goes: one <n>_<step>.log per step (its output,
written while it runs) and steps.tsv (each step's exit status, seconds, time limit and the number of
kernels Triton compiled in it; -9 and "timed out" for a step stopped at its limit). Prints the bench
tables last. Exits 0 when every step did. Triton compiles into a fresh cache under the run's
temporary folder, so that every visit counts (and pays for) all its first compiles alike.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def find(pattern):
    """The one file of the repository matching pattern (the tests may live in a subfolder)."""
    found = sorted(REPO.glob(pattern))
    if not found:
        raise SystemExit(f"gpu_check: no {pattern} under {REPO}")
    return found[0]


def bench_module():
    return "lem.tools.bench" if (REPO / "lem" / "tools" / "bench.py").exists() else "lem.bench"


PROBE = """\
import importlib.util, os, torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: import failed:", type(e).__name__, e)
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"))
print("TF32 defaults: matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          p.shared_memory_per_block_optin, "B shared memory per block (opt-in)", round(p.total_memory / 2**30), "GiB")
else:
    print("no CUDA device")
for name in ("numpy", "scipy", "tqdm", "pytest", "sktime", "soundfile", "torchaudio"):
    print(name, "present" if importlib.util.find_spec(name) else "ABSENT")
"""

# the dry run's bench: one tiny configuration (registered in the process that runs the bench)
DRY_BENCH = "import sys; from {m} import CONFIGS, main; CONFIGS['tiny'] = (6, 4, 8, 2); main(sys.argv[1:])"


# each step's time limit, s: they add up to 6 minutes. The GPU tests and the bench include Triton's
# first compiles (docs/kernels.md, "The GPU check", counts them)
LIMITS = {"nvidia-smi": 15, "python": 35, "tests": 110, "bench": 150, "fhn": 50}


# the bench's configurations, quickest first: the reference loop at EigenWorms (T 17984) takes the
# longest, and what ran before a stop at the limit is in the log
BENCH_ORDER = ["fhn", "smnist_h128", "smnist_h256", "ptb_char", "fhn_b256", "fhn_2layer_bidir", "eigenworms"]


def steps(dry, tmp):
    """[(name, argv, modules it needs)] of the check; python is this interpreter, unbuffered."""
    py = [sys.executable, "-u"]
    tests = [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(find("tests/**/test_gpu_tiers.py"))]
    fhn = [*py, str(REPO / "fitzhugh_nagumo" / "train.py"), "--out-dir", str(tmp / "fhn"),
           "--data-dir", str(tmp / "fhn_data")]
    if dry:
        return [("nvidia-smi", ["nvidia-smi"], ()),
                ("python", [*py, "-c", PROBE], ()),
                ("tests", [*tests, "-k", "matches_reference and case0 or falls_to_the_next"], ("pytest",)),
                ("bench", [*py, "-c", DRY_BENCH.format(m=bench_module()), "kernels", "--devices", "cpu",
                           "--configs", "tiny", "--repeats", "1", "--budget", "1"], ()),
                ("fhn", [*fhn, "--epochs", "1", "--device", "cpu", "--backend", "reference", "--n-train", "4",
                         "--n-valid", "4", "--n-test", "4"], ("scipy",))]
    return [("nvidia-smi", ["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm",
                            "--format=csv"], ()),
            ("python", [*py, "-c", PROBE], ()),
            ("tests", [*tests, "--durations=8"], ("pytest",)),
            ("bench", [*py, "-m", bench_module(), "kernels", "--devices", "cuda", "--repeats", "3", "--budget", "8",
                       "--configs", *BENCH_ORDER], ()),
            ("fhn", [*fhn, "--epochs", "3", "--device", "cuda"], ("scipy",))]


def compiled_kernels(cache):
    """How many kernels Triton has compiled into its cache folder (one .cubin each)."""
    return sum(1 for _ in Path(cache).rglob("*.cubin"))


def run_step(argv, limit, log, env):
    """Runs argv with its output going to the open file log and to stdout as it comes; its exit
    status, or -9 when it was stopped (with every process it started) at `limit` seconds."""
    try:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as error:  # e.g. no nvidia-smi here
        log.write(f"cannot start {argv[0]}: {error}\n".encode())
        return 127, False
    stopped = threading.Event()

    def stop():
        stopped.set()
        os.killpg(proc.pid, signal.SIGKILL)
    timer = threading.Timer(limit, stop)
    timer.start()
    for line in proc.stdout:
        log.write(line)
        log.flush()
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
    rc = proc.wait()
    timer.cancel()
    return rc, stopped.is_set()


def missing(modules):
    import importlib.util
    return [m for m in modules if importlib.util.find_spec(m) is None]


def run_all(plan, out, env, cache, limits=LIMITS):
    """Runs every step of plan in turn, each under its limit; one row per step in out/steps.tsv as
    each ends. The rows."""
    rows = []
    with open(out / "steps.tsv", "w") as table:
        table.write("step\trc\tseconds\tlimit s\tkernels compiled\tnote\n")
        table.flush()
        for i, (name, argv, needs) in enumerate(plan, 1):
            limit = limits[name]
            print(f"\n== {i}. {name} (limit {limit} s, {time.strftime('%H:%M:%S', time.gmtime())} UTC): "
                  f"{' '.join(argv)[:300]}", flush=True)
            before, start = compiled_kernels(cache), time.monotonic()
            with open(out / f"{i}_{name}.log", "wb") as log:
                absent = missing(needs)
                if absent:
                    log.write(f"not run: {', '.join(absent)} absent\n".encode())
                    rc, timed_out, note = None, False, f"not run: {', '.join(absent)} absent"
                else:
                    rc, timed_out = run_step(argv, limit, log, env)
                    note = "timed out" if timed_out else ""
            row = (name, rc, time.monotonic() - start, limit, compiled_kernels(cache) - before, note)
            table.write("\t".join(map(str, row[:2])) + f"\t{row[2]:.1f}\t" + "\t".join(map(str, row[3:])) + "\n")
            table.flush()
            print(f"== {name}: rc {rc}, {row[2]:.1f} s, {row[4]} kernels compiled {note}", flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU tensors under TRITON_INTERPRET=1, tiny sizes")
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT") or REPO / "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(tmp / "triton_cache"))
        if args.dry_run:
            env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        plan = steps(args.dry_run, tmp)
        rows = run_all(plan, out, env, tmp / "triton_cache")
    print("\n== summary (also in steps.tsv)")
    for name, rc, seconds, limit, compiled, note in rows:
        print(f"{name:<11} rc {rc!s:>4}  {seconds:6.1f} s of {limit:>3}  {compiled:>3} kernels compiled  {note}")
    bench = [i for i, row in enumerate(rows, 1) if row[0] == "bench"][0]
    print("\n== the bench tables (also in", f"{bench}_bench.log)")
    print((out / f"{bench}_bench.log").read_text(errors="replace"), flush=True)
    return 0 if all(row[1] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
