"""PTB (docs/paper.md §3.9): data in the real file formats served from 127.0.0.1, stream batching, state
carry, variational state dropout, weight averaging, and ptb/train.py end to end at both levels."""
from importlib import import_module
import functools
import http.server
import io
import json
import math
import sys
import tarfile
import threading

import pytest
import torch

from helpers import read_run, run_train
from lem.tools import bench
from lem.train.cli import build_parser
from lem.train import run
from lem.nn import LEM, lem_step

ptb_data = import_module("ptb.data")
ptb_train = import_module("ptb.train")

WORDS = "the a cat dog sat ran on under mat rug and <unk> N".split()


def word_lines(n, seed):
    g = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        lines.append(" " + " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)) + " \n")
    return lines


def char_line(line):
    """A word line as ptb.char.*.txt writes it: characters separated by spaces, `_` between words."""
    return " " + " _ ".join(" ".join(word) for word in line.split()) + " \n"


SIZES = {"train": 60, "valid": 12, "test": 12}


def corpus_texts():
    words = {split: word_lines(n, seed) for seed, (split, n) in enumerate(SIZES.items())}
    chars = {split: [char_line(line) for line in lines] for split, lines in words.items()}
    return words, chars


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A 127.0.0.1 HTTP server with the word files and a simple-examples.tgz holding all six files."""
    root = tmp_path_factory.mktemp("www")
    words, chars = corpus_texts()
    with tarfile.open(root / "simple-examples.tgz", "w:gz") as tar:
        for level, texts in (("word", words), ("char", chars)):
            for split, lines in texts.items():
                blob = "".join(lines).encode()
                name = ptb_data.file_name(level, split)
                (root / name).write_bytes(blob)
                info = tarfile.TarInfo(f"./simple-examples/data/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "words": words, "chars": chars}
    httpd.shutdown()


def test_word_files_vocabulary_and_unk(server, tmp_path):
    vocab, ids = ptb_data.load_corpus("word", tmp_path, server["url"])
    train_tokens = "".join(server["words"]["train"]).split()
    assert set(vocab) == set(train_tokens) | {"<eos>"}
    assert ids["train"].tolist() == [vocab[t] for line in server["words"]["train"] for t in line.split() + ["<eos>"]]
    # a word the training split never saw becomes <unk>
    (tmp_path / "ptb.valid.txt").write_text(" cat zebra \n")
    encoded = ptb_data.encode(ptb_data.read_tokens(tmp_path / "ptb.valid.txt"), vocab, "valid")
    assert encoded.tolist() == [vocab["cat"], vocab["<unk>"], vocab["<eos>"]]


def test_char_files_come_out_of_the_archive(server, tmp_path):
    vocab, ids = ptb_data.load_corpus("char", tmp_path, server["url"])
    assert (tmp_path / "simple-examples.tgz").exists()
    for split in ptb_data.SPLITS:
        assert (tmp_path / f"ptb.char.{split}.txt").read_text() == "".join(server["chars"][split])
    assert "_" in vocab and "<eos>" in vocab and all(len(t) == 1 for t in vocab if t != "<eos>")
    first = server["chars"]["train"][0].split()
    assert ids["train"][:len(first)].tolist() == [vocab[c] for c in first]
    with pytest.raises(ValueError, match="never uses"):  # no <unk> among characters
        ptb_data.encode(["a", "Z"], vocab, "ptb.char.valid.txt")


def test_broken_archive_names_url_and_folder(tmp_path):
    (tmp_path / "simple-examples.tgz").write_bytes(b"not a tar file")
    with pytest.raises(ptb_data.DataError, match="by hand") as e:
        ptb_data.fetch("char", tmp_path, "http://127.0.0.1:9")
    assert "http://127.0.0.1:9/simple-examples.tgz" in str(e.value) and str(tmp_path) in str(e.value)


def test_windows_target_the_next_token_across_window_boundaries():
    ids = torch.arange(103)
    streams = ptb_data.batchify(ids, 4)                 # 4 streams of 25, 3 tokens dropped
    assert streams.shape == (25, 4) and streams[:, 1].tolist() == list(range(25, 50))
    n = ptb_data.num_windows(streams, 7)
    pieces = [ptb_data.window(streams, i, 7) for i in range(n)]
    assert [len(x) for x, _ in pieces] == [7, 7, 7, 3]
    for x, y in pieces:
        assert torch.equal(y, x + 1)                     # within each stream the next token is id + 1
    assert torch.equal(torch.cat([x for x, _ in pieces]), streams[:-1])  # windows tile the streams
    assert torch.equal(torch.cat([y for _, y in pieces]), streams[1:])


def test_evaluation_streams_hold_every_prediction_once():
    ids = torch.arange(50)
    x, y = ptb_data.eval_streams(ids, 4)
    real = y != -100
    assert sorted(x[real].tolist()) == list(range(49))
    assert torch.equal(y[real], x[real] + 1)
    assert not real[:, :3].logical_not().any()          # only the last stream is padded


def make_task(server, tmp_path, level="word", *extra):
    cls = ptb_train.LEVELS[level]
    args = build_parser(cls).parse_args(["--level", level, "--nhid", "8", "--emsize", "8", "--batch", "3",
                                         "--bptt", "6", "--data-url", server["url"], *map(str, extra)])
    args.data_dir = str(tmp_path)
    torch.manual_seed(0)
    task = cls(args, torch.device("cpu"))
    return task, task.build_model()


def test_state_is_carried_between_windows_and_reset_per_pass(server, tmp_path):
    task, model = make_task(server, tmp_path)
    model.eval()  # dropout off: the losses below must match exactly
    n, l2 = task.n_windows, task.args.l2 * ptb_train.l2_penalty(model)
    losses = [task.loss(model, step) for step in range(n + 1)]
    assert all(not s.requires_grad for s in task.carry)

    def ce(i, state):
        x, y = ptb_data.window(task.train_streams, i, 6)
        logits, state = model(x, state)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()) + l2, state

    state = None
    for i in range(n):
        expected, state = ce(i, state)
        assert torch.allclose(losses[i], expected)
    assert torch.allclose(losses[n], ce(0, None)[0])   # step n starts a new pass from the zero state
    assert not torch.allclose(ce(1, None)[0], losses[1])  # the carried state matters


def manual(layer, x, mask):
    y = z = x.new_zeros(x.size(1), layer.hidden_size)
    u_proj, ys = layer.inp2hid(x), []
    for u in u_proj:
        y, z = lem_step(u, y, z, layer.hid2hid, layer.transform_z, layer.dt, mask)
        ys.append(y)
    return torch.stack(ys)


def test_state_dropout_one_mask_per_window():
    torch.manual_seed(0)
    layer = LEM(3, 16, dt=1.0, state_dropout=0.5)
    x1, x2 = torch.randn(2, 12, 4, 3)
    torch.manual_seed(1)
    out1, out2 = layer(x1)[0], layer(x2)[0]
    torch.manual_seed(1)
    m1, m2 = layer.state_dropout_mask(4, x1), layer.state_dropout_mask(4, x1)
    assert not torch.equal(m1, m2) and set(m1.unique().tolist()) == {0.0, 2.0}
    assert torch.allclose(out1, manual(layer, x1, m1), atol=1e-6)  # one mask, every step of the window
    assert torch.allclose(out2, manual(layer, x2, m2), atol=1e-6)  # a new one for the next window
    assert not torch.allclose(out1, manual(layer, x1, None))
    layer.eval()
    assert torch.allclose(layer(x1)[0], manual(layer, x1, None), atol=1e-6)


def test_state_dropout_zero_is_the_plain_layer():
    torch.manual_seed(0)
    plain = LEM(3, 16)
    dropped = LEM(3, 16, state_dropout=0.0)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(10, 4, 3)
    assert torch.equal(plain(x)[0], dropped(x)[0])
    with pytest.raises(ValueError, match="state_dropout"):
        LEM(3, 16, state_dropout=1.0)


def test_model_init_and_tying(server, tmp_path):
    task, model = make_task(server, tmp_path)
    assert model.decoder.weight is model.embedding.weight
    H = 8
    b1 = model.rnn.inp2hid.bias[H:2 * H] + model.rnn.hid2hid.bias[H:2 * H]
    assert torch.equal(b1, torch.ones(H)) and model.rnn.dt == 1.0
    assert task.averaged.module.decoder.weight is task.averaged.module.embedding.weight
    with pytest.raises(ValueError, match="emsize == --nhid"):
        ptb_train.LanguageModel(20, 8, 16, 0, 0, 0, True)


def test_averaged_model_is_the_mean_of_the_snapshots(server, tmp_path):
    task, model = make_task(server, tmp_path)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    task.averaging_from = 0
    snapshots = []
    for step in range(4):
        optimizer.zero_grad()
        task.loss(model, step).backward()
        optimizer.step()
        task.after_step(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    averaged = task.averaged.module.state_dict()
    for k in averaged:
        assert torch.allclose(averaged[k], torch.stack([s[k] for s in snapshots]).mean(0), atol=1e-6)
    model.eval()
    with torch.no_grad():
        metrics = task.evaluate(model, "valid")
        task.averaging_from = None
        plain = task.evaluate(model, "valid")
    assert metrics["averaged"] and not plain["averaged"] and metrics["ppl"] != plain["ppl"]
    assert math.isclose(metrics["ppl"], math.exp(metrics["nll"]))


def test_averaging_starts_when_validation_stalls_then_the_run_stops(server, tmp_path):
    task, _ = make_task(server, tmp_path, "word", "--avg-patience", 2, "--avg-latest", 100, "--epochs", 50)
    for turn, ppl in enumerate([9, 8, 8.5, 8.2, 7, 6.9, 7.1], start=1):
        task.after_evaluation(turn, {"valid": {"ppl": ppl}})
        if turn == 3:
            assert task.averaging_from is None
    assert task.averaging_from == 4 and task.stop_turn is None   # turn 2 best, 2 turns without gain
    task.after_evaluation(8, {"valid": {"ppl": 7.2}})
    assert task.stop_turn == 8 and task.num_epochs() == 8        # averaged best at turn 6
    late, _ = make_task(server, tmp_path, "word", "--avg-latest", 3)
    for turn in (1, 2, 3):
        late.after_evaluation(turn, {"valid": {"ppl": 10.0 - turn}})
    assert late.averaging_from == 3


def test_level_defaults_are_the_papers():
    word = build_parser(ptb_train.task_for([])).parse_args([])
    char = build_parser(ptb_train.task_for(["--level", "char"])).parse_args(["--level", "char"])
    assert (word.nhid, word.emsize, word.batch, word.bptt, word.lr, word.grad_norm, word.l2) == \
        (256, 256, 64, 70, 6.84e-4, 4.0, 3.31e-4)
    assert (word.dropout_in, word.dropout_out, word.dropout_state, word.tie_weights) == (0.4248, 0.4568, 0.1963, True)
    assert (char.nhid, char.emsize, char.batch, char.bptt, char.lr, char.grad_norm, char.l2) == \
        (1024, 200, 128, 150, 6.58e-4, 1.0, 2.63e-4)
    assert (char.dropout_in, char.dropout_out, char.dropout_state, char.tie_weights) == (0.0474, 0.1908, 0.1855, False)
    assert (word.avg_patience, word.avg_latest, char.avg_patience, char.avg_latest) == (50, 800, 25, 400)


TINY = ["--nhid", 8, "--emsize", 8, "--batch", 3, "--bptt", 6, "--eval-every", 2, "--max-steps", 4,
        "--avg-latest", 1]


def train_in_process(*args, out_dir, data_dir):
    """ptb/train.py's main without a new interpreter (importing torch costs seconds on a busy machine)."""
    argv = [*map(str, args), "--out-dir", str(out_dir), "--data-dir", str(data_dir), "--device", "cpu"]
    return run(ptb_train.task_for(argv), argv)


@pytest.mark.parametrize("level,metric", [("word", "ppl"), ("char", "bpc")])
def test_train_end_to_end(server, tmp_path, level, metric):
    args = ["--level", level, *TINY, "--data-url", server["url"], "--run-name", "r"]
    if level == "word":  # once as a user runs it, in its own interpreter
        run_train("ptb", *args, out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    else:
        train_in_process(*args, out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    summary, config, log = read_run(tmp_path / "out" / "r")
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["metric"] == metric
    assert [r["valid"]["averaged"] for r in log] == [False, True]  # averaging from turn 1 on (--avg-latest 1)
    assert all(math.isfinite(r[s][metric]) for r in log for s in ("valid", "test"))
    bound = math.log(len(ptb_data.load_corpus(level, tmp_path / "data" / "ptb", server["url"])[0]))
    assert log[-1]["valid"]["nll"] < bound  # better than uniform after 4 steps
    assert config["args"]["level"] == level


def test_resume_is_exact(server, tmp_path):
    """Stopped after every step (--max-time 0) and resumed: carried state, averaging and RNGs come back."""
    common = ["--level", "word", *TINY, "--data-url", server["url"]]
    train_in_process(*common, "--run-name", "straight", out_dir=tmp_path, data_dir=tmp_path / "data")
    train_in_process(*common, "--run-name", "pieces", "--max-time", 0, out_dir=tmp_path, data_dir=tmp_path / "data")
    first = json.loads((tmp_path / "pieces" / "summary.json").read_text())
    assert first["status"] == "interrupted" and first["steps"] == 1
    for _ in range(3):
        train_in_process(*common, "--run-name", "pieces", "--max-time", 0, "--resume",
                         out_dir=tmp_path, data_dir=tmp_path / "data")
    straight, pieces = read_run(tmp_path / "straight"), read_run(tmp_path / "pieces")
    assert pieces[0]["status"] == "finished" and pieces[0]["steps"] == 4
    assert [r["valid"] for r in straight[2]] == [r["valid"] for r in pieces[2]]
    assert [r["test"] for r in straight[2]] == [r["test"] for r in pieces[2]]


def test_dt_and_backend_reach_the_model_and_its_average(server, tmp_path):
    task, model = make_task(server, tmp_path, "word", "--dt", "0.5", "--backend", "reference")
    for net in (model, task.averaged.module):
        assert net.rnn.dt == 0.5 and net.rnn.backend == "reference"
    _, default = make_task(server, tmp_path, "word")
    assert default.rnn.dt == 1.0 and default.rnn.backend == "auto"  # docs/paper.md §3.9: Δt = 1


def test_bench_times_the_training_step_in_tokens_per_second(tmp_path, capsys):
    bench.main(["epoch", "ptb", "--level", "char", "--synthetic", "--no-eval", "--batches", "2", "--warmup", "0",
                "--nhid", "8", "--emsize", "4", "--batch", "2", "--bptt", "3", "--device", "cpu",
                "--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ptb (synthetic data): model lem, H 8, batch 2, backend auto, cpu" in out
    assert "training tokens/s" in out and "(batch 2 x bptt 3 per step)" in out and "one epoch (200 steps)" in out
