"""lem.data.cached, the one processed-data cache of every data.py: built once, rebuilt when its
sources or parameters change or when it does not load."""
import errno
import hashlib
import json
import os
import time

import pytest
import torch

from lem import atomic
from lem.data import DataError, cached
from lem.data.cache import STALE_SECONDS


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


def test_a_cache_that_does_not_parse_or_holds_the_wrong_structure_is_rebuilt(tmp_path, capsys):
    path, builds = tmp_path / "data.pt", []

    def build():
        builds.append(1)
        return {"x": torch.arange(3)}

    def load():
        return cached(path, build, params={"n": 3}, check=lambda d: d["x"].shape == (3,))

    load()
    path.with_suffix(".json").write_text("{ not json")
    assert load()["x"].tolist() == [0, 1, 2] and len(builds) == 2
    assert f"{path.with_suffix('.json')} does not parse (JSONDecodeError); processing again" in capsys.readouterr().out
    torch.save({"y": 1}, path)  # loads, but an older layout: check() raises KeyError
    assert load()["x"].tolist() == [0, 1, 2] and len(builds) == 3
    assert f"{path} does not hold what it should" in capsys.readouterr().out
    load()
    assert len(builds) == 3  # and a whole one is kept


class FullDisk:
    """A temporary file on a disk that fills after its first kilobyte."""

    def __init__(self, f):
        self.f, self.written = f, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):  # flush, fileno
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_while_caching_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(DataError, match=r"could not write the cache .*data.pt: No space left on device; nothing "):
        cached(tmp_path / "data.pt", lambda: {"x": torch.zeros(10_000)})  # 40 kB: torch's zip writer fails
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path, capsys):
    stale, fresh = tmp_path / ".data.pt.abc.tmp", tmp_path / ".data.pt.def.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * STALE_SECONDS
    os.utime(stale, (old, old))
    cached(tmp_path / "data.pt", lambda: {"x": 1})
    assert not stale.exists() and fresh.exists()
    assert f"removed {stale}, left by a write cut short" in capsys.readouterr().out
    assert (tmp_path / "data.pt").stat().st_mode & 0o777 == 0o666 & ~atomic.umask()
