"""Google12 (docs/paper.md §3.4): a tiny Speech Commands V2 archive in the real layout, served from 127.0.0.1,
through download, checksum, extraction, split, features and one training epoch; the features
against an independent numpy computation of the same definition."""
from importlib import import_module
import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch
import torchaudio

from helpers import read_run, run_train

data = import_module("google12.data")

RATE = 16000
UNKNOWN_WORDS = ("bed", "marvin", "backward")
FOLDERS = data.WORDS + UNKNOWN_WORDS
NOISE_SECONDS = {"white_noise.wav": 2.5, "running_tap.wav": 1.2}  # → 2 + 1 silence clips


def tone(freq, n, seed=0):
    t = np.arange(n) / RATE
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def wav_bytes(samples, rate=RATE, channels=1):
    buf = io.BytesIO()
    soundfile.write(buf, np.tile(samples[:, None], channels) if channels > 1 else samples, rate,
                    format="WAV", subtype="PCM_16")
    return buf.getvalue()


def make_archive(path):
    """speech_commands_v0.02.tar.gz in the real layout: ./<word>/<speaker>_nohash_<k>.wav, 16 kHz 16-bit
    mono; _background_noise_ with long recordings and a README; the two list files; LICENSE, README.md.
    Per word 3 clips: the first listed for validation, the second for testing, the third (shorter than
    1 s, as many real clips are) for training."""
    files, valid, test = {}, [], []
    for i, word in enumerate(FOLDERS):
        for k, n in enumerate((RATE, RATE, 12000)):
            name = f"{word}/{1000 + i:08x}_nohash_{k}.wav"
            files[name] = wav_bytes(tone(200 + 150 * i, n, seed=10 * i + k))
            (valid if k == 0 else test if k == 1 else []).append(name)
    for j, (name, seconds) in enumerate(NOISE_SECONDS.items()):
        files[f"{data.NOISE}/{name}"] = wav_bytes(np.random.default_rng(j).normal(0, 0.1, int(seconds * RATE)).astype(np.float32))
    files[f"{data.NOISE}/README.md"] = b"background noise\n"
    files["validation_list.txt"] = "".join(f"{n}\n" for n in valid).encode()
    files["testing_list.txt"] = "".join(f"{n}\n" for n in test).encode()
    files["LICENSE"] = files["README.md"] = b"text\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, served folder, sha256 of the archive): an HTTP server on 127.0.0.1."""
    folder = tmp_path_factory.mktemp("www")
    digest = make_archive(folder / data.ARCHIVE)
    (folder / "garbage.tar.gz").write_bytes(b"not a tar archive" * 100)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, digest
    httpd.shutdown()


@pytest.fixture(scope="module")
def extracted(server, tmp_path_factory):
    url, _, digest = server
    root = tmp_path_factory.mktemp("data") / "speech_commands"
    data.fetch(root, f"{url}/{data.ARCHIVE}", digest)
    return root


def test_constants_are_torchaudios():
    checksums = getattr(torchaudio.datasets.speechcommands, "_CHECKSUMS", None)
    if checksums is None:
        pytest.skip("this torchaudio has no checksum table")
    assert checksums[data.URL] == data.SHA256


def test_class_mapping():
    assert data.CLASSES == ("unknown", "silence", "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
    for word in data.WORDS:
        assert data.CLASSES[data.label_of(word)] == word
    v2_others = ("zero one two three four five six seven eight nine bed bird cat dog happy house marvin sheila "
                 "tree wow backward forward follow learn visual").split()
    assert all(data.label_of(w) == 0 for w in v2_others)
    assert data.label_of(data.NOISE) == 1


def test_split_follows_list_files(extracted):
    lists = {split: set((extracted / data.FOLDER / f"{name}_list.txt").read_text().split())
             for split, name in (("valid", "validation"), ("test", "testing"))}
    seen = {}
    for split in data.SPLITS:
        for path, start, stop, label in data.clip_list(extracted, split):
            folder = path.parent.name
            assert label == data.label_of(folder), path
            name = f"{folder}/{path.name}"
            if folder == data.NOISE:
                assert split == "train" and stop - start == RATE
            else:
                assert name not in seen, f"{name} in {seen.get(name)} and {split}"
                seen[name] = split
                assert name in lists[split] if split != "train" else name not in lists["valid"] | lists["test"]
    assert len(seen) == 3 * len(FOLDERS)  # every word clip in exactly one split
    silence = [c for c in data.clip_list(extracted, "train") if c[3] == 1]
    assert len(silence) == sum(int(s) for s in NOISE_SECONDS.values())  # non-overlapping 1 s segments


def test_checksum_mismatch_and_corrupt_archive(server, tmp_path):
    url, _, _ = server
    with pytest.raises(data.DataError, match=f"{url}/{data.ARCHIVE}.*expected 0000"):
        data.fetch(tmp_path, f"{url}/{data.ARCHIVE}", sha256="0" * 64)
    assert not (tmp_path / data.ARCHIVE).exists() and not (tmp_path / data.FOLDER).exists()
    with pytest.raises(data.DataError, match="not a readable tar.gz.*garbage.tar.gz"):
        data.fetch(tmp_path, f"{url}/garbage.tar.gz", sha256=None)
    assert not (tmp_path / data.FOLDER).exists()


def test_wav_reading(tmp_path):
    stereo = tmp_path / "stereo.wav"
    stereo.write_bytes(wav_bytes(tone(440, 800), channels=2))
    with pytest.raises(data.DataError, match="stereo.wav.*16 kHz mono"):
        data.read_wav(stereo)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVE")
    with pytest.raises(data.DataError, match="broken.wav"):
        data.read_wav(broken)
    with pytest.raises(ValueError, match="shape"):
        data.LogMel()(torch.zeros(16000))
    tiny = tmp_path / "tiny.wav"  # shorter than the 512 samples reflect padding needs: zero-padded to 513
    tiny.write_bytes(wav_bytes(tone(440, 300)))
    assert data.read_wav(tiny).shape == (513,) and data.read_wav(tiny)[300:].abs().max() == 0


# An independent computation of docs/paper.md §3.4 in numpy/scipy (librosa's definition, written out).
def hz_to_mel(f):
    """Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per ln 6.4)."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000, f / (200 / 3), 15 + np.log(np.maximum(f, 1e-9) / 1000) * 27 / np.log(6.4))


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15, m * (200 / 3), 1000 * np.exp((m - 15) * np.log(6.4) / 27))


def mel_filterbank(n_freqs=513, n_mels=80, fmin=40.0, fmax=8000.0):
    """Triangles between consecutive mel-spaced edges, each scaled to area-like norm 2 / (right − left)."""
    freqs = np.linspace(0, RATE / 2, n_freqs)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    bank = np.zeros((n_mels, n_freqs))
    for m in range(n_mels):
        left, centre, right = edges[m:m + 3]
        rising, falling = (freqs - left) / (centre - left), (right - freqs) / (right - centre)
        bank[m] = np.maximum(0, np.minimum(rising, falling)) * 2 / (right - left)
    return bank


def numpy_features(x, n_fft=1024, hop=128, frames=126):
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")  # centred frames
    window = scipy.signal.get_window("hann", n_fft)  # periodic Hann
    stft = np.stack([np.fft.rfft(padded[t * hop:t * hop + n_fft] * window) for t in range(1 + len(x) // hop)])
    mel = mel_filterbank() @ np.abs(stft).T  # (80, frames), magnitude
    db = 10 * np.log10(np.maximum(mel, 1e-10) / max(mel.max(), 1e-10))
    db = np.maximum(db, -80.0)
    out = np.zeros((80, frames))
    out[:, :min(frames, db.shape[1])] = db[:, :frames]
    return ((out - out.mean()) / out.std(ddof=1)).T, db


def logmel64():
    """LogMel with its window and filterbank made in float64: a float32 Hann window alone leaks
    ~1e-7 of a tone into every band, which is −70 dB, above the −80 dB floor."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return data.LogMel()
    finally:
        torch.set_default_dtype(default)


def test_filterbank_matches_numpy():
    np.testing.assert_allclose(logmel64().mel.mel_scale.fb.T.numpy(), mel_filterbank(), rtol=1e-9, atol=1e-12)
    ours32 = data.LogMel().mel.mel_scale.fb.double().T.numpy()  # the one in use, made in float32
    np.testing.assert_allclose(ours32, mel_filterbank(), rtol=1e-5, atol=1e-5 * mel_filterbank().max())


@pytest.mark.parametrize("n", [12000, 16000, 20000])  # padded (94 frames), exact (126), cut (157)
def test_features_match_numpy_on_a_sine(n):
    x = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / RATE)
    expected, db = numpy_features(x)
    assert (db == -80).any() and db.max() == 0  # the floor and the reference level are exercised
    assert db.shape[1] == 1 + n // 128
    got64 = logmel64()(torch.from_numpy(x)[None])[0].numpy()
    assert got64.shape == (126, 80)
    np.testing.assert_allclose(got64, expected, atol=1e-6)
    # the float32 pipeline that fills the cache: its rounding noise sits near −70 dB, which only a
    # noiseless tone reaches; with a little noise (as in any recording) it agrees closely
    noisy = (x + np.random.default_rng(0).normal(0, 1e-3, n)).astype(np.float32)
    got32 = data.LogMel()(torch.from_numpy(noisy)[None])[0].numpy()
    np.testing.assert_allclose(got32, numpy_features(noisy)[0], atol=1e-3)
    # the loudest band is the one whose centre is closest to 1 kHz
    centres = mel_to_hz(np.linspace(hz_to_mel(40), hz_to_mel(8000), 82))[1:-1]
    assert got64[10].argmax() == np.abs(centres - 1000).argmin()


def test_batch_is_per_clip_and_silence_is_zero():
    logmel = data.LogMel()
    a, b = torch.from_numpy(tone(300, 16000)), 1e-6 * torch.from_numpy(tone(3000, 16000, seed=1))  # b: 60 dB lower
    batch = logmel(torch.stack([a, b, torch.zeros(16000)]))
    torch.testing.assert_close(batch[0], logmel(a[None])[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch[1], logmel(b[None])[0], atol=1e-4, rtol=0)  # own max, own floor
    assert torch.equal(batch[2], torch.zeros(126, 80))


def test_end_to_end_from_local_server(server, tmp_path):
    url, _, digest = server
    common = ["--epochs", 1, "--nhid", 8, "--batch", 8, "--url", f"{url}/{data.ARCHIVE}"]
    run_train("google12", *common, "--sha256", digest, out_dir=tmp_path / "out", data_dir=tmp_path / "data")
    summary, config, log = read_run(tmp_path / "out" / "lem_h8_seed5544")
    assert summary["status"] == "finished" and summary["metric"] == "accuracy" and summary["paper"] == 95.7
    assert 0 <= summary["test"] <= 100 and len(log) == 1
    assert config["args"]["drop"] == 0.03 and config["args"]["lr_decay_epoch"] == 50

    cache = tmp_path / "data" / "speech_commands" / "features.pt"
    manifest = json.loads(cache.with_suffix(".json").read_text())
    assert manifest["params"]["sha256"] == digest and manifest["params"]["features"]["n_mels"] == 80
    counts = manifest["notes"]["splits"]
    n_words = len(FOLDERS)
    assert {s: counts[s]["clips"] for s in data.SPLITS} == {"train": n_words + 3, "valid": n_words, "test": n_words}
    assert counts["train"]["per_class"]["silence"] == 3 and counts["valid"]["per_class"]["silence"] == 0
    assert counts["train"]["per_class"]["unknown"] == len(UNKNOWN_WORDS)
    train = torch.load(cache)["train"]
    assert train["x"].shape == (n_words + 3, 126, 80) and train["x"].dtype == torch.float16
    folder = tmp_path / "data" / "speech_commands" / data.FOLDER
    expected = data.LogMel()(data.read_wav(folder / train["clips"][0])[None])[0]  # a word clip shorter than 1 s
    torch.testing.assert_close(train["x"][0].float(), expected, atol=5e-3, rtol=1e-3)
    noise_file, start = train["clips"][-1].split("@")  # the last silence segment: second 2 of white_noise.wav
    assert (noise_file, start, train["y"][-1].item()) == (f"{data.NOISE}/white_noise.wav", "16000", 1)
    expected = data.LogMel()(data.read_wav(folder / noise_file, 16000, 32000)[None])[0]
    torch.testing.assert_close(train["x"][-1].float(), expected, atol=5e-3, rtol=1e-3)

    # a second time the cache is read: no download (the URL is dead), no recomputation
    mtime = cache.stat().st_mtime
    splits = data.load_splits(tmp_path / "data", "http://127.0.0.1:9/gone.tar.gz", digest)
    assert torch.equal(splits["train"][0], train["x"]) and cache.stat().st_mtime == mtime


def test_download_failure_is_a_message(server, tmp_path):
    url, _, _ = server
    proc = run_train("google12", "--epochs", 1, "--url", f"{url}/missing.tar.gz",
                     out_dir=tmp_path / "out", data_dir=tmp_path / "data", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"{url}/missing.tar.gz answered HTTP 404" in proc.stderr
    assert str(tmp_path / "data" / "speech_commands") in proc.stderr
