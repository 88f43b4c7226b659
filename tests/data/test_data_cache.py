"""lem.data.cached, the one processed-data cache of every data.py: built once, rebuilt when its
sources or parameters change or when it does not load."""
import hashlib
import json

import torch

from lem.data import cached


def test_cache_is_built_once_and_rebuilt_when_what_it_was_made_from_changes(tmp_path, capsys):
    source, path, builds = tmp_path / "raw.txt", tmp_path / "cache" / "data.pt", []
    source.write_text("1 2 3")

    def build():
        builds.append(1)
        return {"x": torch.tensor([float(v) for v in source.read_text().split()])}

    def load(params):
        return cached(path, build, [source], params, notes=lambda d: {"n": len(d["x"])})

    first = load({"seed": 1})
    assert torch.equal(load({"seed": 1})["x"], first["x"]) and len(builds) == 1
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["params"] == {"seed": 1} and manifest["notes"] == {"n": 3} and "seconds" in manifest["built"]
    assert list(manifest["sources"].values()) == [hashlib.sha256(b"1 2 3").hexdigest()]

    load({"seed": 2})  # other parameters
    source.write_text("4 5")  # another source
    assert load({"seed": 2})["x"].tolist() == [4.0, 5.0] and len(builds) == 3
    assert "sources or parameters changed" in capsys.readouterr().out
    path.write_bytes(path.read_bytes()[:20])  # damaged
    assert load({"seed": 2})["x"].tolist() == [4.0, 5.0] and len(builds) == 4
    assert "does not load" in capsys.readouterr().out
