"""`import lem` loads the layer and its kernels' dispatch only: no trainer, data helper or tool, and
none of what they import (tqdm, the distributed launcher's helpers)."""
import json
import subprocess
import sys

from helpers import REPO, train_env

PROBE = """
import json, sys
import torch
before = set(sys.modules)
import lem
lem.LEM(2, 3)
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_import_lem_loads_no_trainer_tqdm_or_distributed_module():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=train_env(), capture_output=True, text=True,
                          timeout=120, check=True)
    new = json.loads(done.stdout.splitlines()[-1])
    assert any(m == "lem.nn" for m in new)
    unwanted = [m for m in new if m.startswith(("lem.train", "lem.data", "lem.tools", "tqdm", "torch.distributed"))]
    assert unwanted == []
