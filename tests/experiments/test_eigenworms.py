"""The EigenWorms path (docs/paper.md §3.2) on UEA datasets sktime ships in its package (no download):
BasicMotions (equal length, 6 channels) and JapaneseVowels (unequal lengths, 12 channels)."""
from importlib import import_module
import json

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split
from sktime.datasets import load_UCR_UEA_dataset

from helpers import read_run, run_train
from lem.tools import results

data = import_module("eigenworms.data")


def test_split_labels_and_channels_as_the_reference(tmp_path):
    loaded = data.load_splits("BasicMotions", tmp_path)
    X, y = load_UCR_UEA_dataset("BasicMotions")  # train part then test part
    series = np.stack([np.stack([X.iat[i, c] for c in range(6)], axis=1) for i in range(len(X))])  # (80, 100, 6)
    tr, rest = train_test_split(np.arange(80), test_size=0.3, random_state=1234)
    va, te = train_test_split(rest, test_size=0.5, random_state=1234)
    assert loaded["classes"] == sorted(set(y))
    for part, idx in (("train", tr), ("valid", va), ("test", te)):
        x, labels, lengths = loaded["splits"][part]
        assert x.dtype == torch.float32 and x.shape == (100, len(idx), 6)
        np.testing.assert_allclose(x.permute(1, 0, 2).numpy(), series[idx], rtol=1e-6)
        assert [loaded["classes"][k] for k in labels] == list(y[idx])
        assert lengths.tolist() == [100] * len(idx)
    assert [len(loaded["splits"][p][1]) for p in ("train", "valid", "test")] == [56, 12, 12]


def test_unequal_lengths_are_padded_and_cached(tmp_path, monkeypatch):
    loaded = data.load_splits("JapaneseVowels", tmp_path)
    X, _ = load_UCR_UEA_dataset("JapaneseVowels")
    tr, _ = train_test_split(np.arange(len(X)), test_size=0.3, random_state=1234)
    x, _, lengths = loaded["splits"]["train"]
    assert len(set(lengths.tolist())) > 5 and x.size(0) == lengths.max()
    for j in (0, 1, 2):
        original = np.stack([X.iat[tr[j], c] for c in range(12)], axis=1)
        assert lengths[j] == len(original)
        np.testing.assert_allclose(x[:lengths[j], j].numpy(), original, rtol=1e-6)
        assert (x[lengths[j]:, j] == 0).all()
    manifest = json.loads((tmp_path / "eigenworms" / "JapaneseVowels.json").read_text())
    assert manifest["params"]["split_seed"] == 1234 and len(manifest["sources"]) == 2
    monkeypatch.setattr(data, "read_dataset", lambda *a: pytest.fail("parsed again despite the cache"))
    again = data.load_splits("JapaneseVowels", tmp_path)
    assert torch.equal(again["splits"]["test"][0], loaded["splits"]["test"][0])


def test_a_ts_file_cut_short_is_named(tmp_path):
    """A .ts file cut at a line boundary still parses: the paper's series count (259) names it."""
    folder = tmp_path / "uea_ucr" / "EigenWorms"
    folder.mkdir(parents=True)
    for part in ("TRAIN", "TEST"):  # BasicMotions' files (40 series each) as EigenWorms'
        lines = (data.BUNDLED / "BasicMotions" / f"BasicMotions_{part}.ts").read_text().splitlines(keepends=True)
        (folder / f"EigenWorms_{part}.ts").write_text("".join(lines[:-28] if part == "TEST" else lines))
    with pytest.raises(data.DataError) as e:
        data.load_splits("EigenWorms", tmp_path)
    assert str(e.value) == (f"EigenWorms has 259 series (docs/paper.md §3.2), its files hold 52 ({folder}/EigenWorms_TRAIN.ts "
                            f"40 and {folder}/EigenWorms_TEST.ts 12): one is cut short or damaged. Delete {folder} to "
                            f"download it again.")


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a UEA/UCR classification dataset"):
        data.load_splits("NoSuchWorms", tmp_path)


def test_train_end_to_end_with_seeds_and_results(tmp_path, capsys):
    out = tmp_path / "runs"
    run_train("eigenworms", "--dataset", "JapaneseVowels", "--seeds", 1, 2, "--epochs", 1, "--nhid", 8,
              "--dt", 0.5, "--lr", 0.01, out_dir=out, data_dir=tmp_path / "data")
    accuracies = []
    for seed in (1, 2):
        summary, config, log = read_run(out / f"JapaneseVowels_lem_h8_seed{seed}")
        assert summary["status"] == "finished" and config["args"]["dataset"] == "JapaneseVowels"
        assert set(log[0]) >= {"valid", "test"} and summary["test"] == log[0]["test"]["accuracy"]
        accuracies.append(summary["test"])
    assert min(accuracies) > 30  # 9 speakers: chance is 11 %
    results.main([str(out)])
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("eigenworms"))
    assert f"{np.mean(accuracies):.4g} ± {np.std(accuracies, ddof=1):.2g}" in row and " 2 " in row
