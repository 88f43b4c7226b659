"""Speech Commands V2 as the 12-class Google12 task (docs/paper.md §3.4): download, split, log-mel features.

Everything lives in <data_dir>/speech_commands/:
    speech_commands_v0.02.tar.gz               the archive, sha256 checked (kept after extraction)
    SpeechCommands/speech_commands_v0.02/      extracted once, the layout torchaudio's SPEECHCOMMANDS
                                               reads (a copy it downloaded itself works too)
    features.pt                                per split and clip a (126, 80) float16 feature sequence,
                                               a label and the clip's name (lem.data.cached)
    features.json                              its manifest: the archive's sha256 and the feature
                                               settings it was made with, per-class counts, build time

Features are computed once, so training epochs read tensors, not audio. synthetic_splits stands
in with random features of the real sizes (for timing without the archive).
Silence (class 1) = every non-overlapping 1 s segment of each `_background_noise_` recording (the
remainder shorter than 1 s is dropped), training split only. The reference instead fed each whole
recording, cut to its first 126 frames, as one clip: 6 silence clips against our ~400.
"""
import os
import shutil
import tarfile
from pathlib import Path

import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

from lem.data import DataError, cached
from lem.data.download import by_hand, download

URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
SHA256 = "af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58"
ARCHIVE = "speech_commands_v0.02.tar.gz"
FOLDER = Path("SpeechCommands") / "speech_commands_v0.02"  # where torchaudio's SPEECHCOMMANDS looks
SAMPLE_RATE = 16000
WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
CLASSES = ("unknown", "silence") + WORDS
NOISE = "_background_noise_"
SPLITS = {"train": "training", "valid": "validation", "test": "testing"}  # ours → torchaudio's subsets

MEL = dict(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=128, n_mels=80, f_min=40.0, f_max=8000.0,
           power=1.0, norm="slaney", mel_scale="slaney", center=True, pad_mode="reflect")
TOP_DB, FRAMES = 80.0, 126
FEATURES = {**MEL, "db": "10*log10(S / max S)", "top_db": TOP_DB, "frames": FRAMES,
            "zscore": "per utterance", "dtype": "float16",
            "silence": "non-overlapping 1 s segments of _background_noise_, training only"}


def label_of(folder):
    """Class index of a word folder (docs/paper.md §3.4): the 10 words, silence 1, every other word unknown 0."""
    if folder == NOISE:
        return 1
    return CLASSES.index(folder) if folder in WORDS else 0


class LogMel(torch.nn.Module):
    """Waveforms (N, samples) of one length → features (N, 126, 80), docs/paper.md §3.4.

    mel magnitude spectrogram (librosa's conventions: Slaney scale and area norm, centred frames with
    reflect padding) → 10·log10(S / max S) floored at −80 dB, per clip → zero-pad or cut to 126 frames
    → z-score per clip (mean and unbiased std over all its values; a constant clip becomes zeros).
    """

    def __init__(self):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(**MEL)
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=TOP_DB)

    def forward(self, waves):
        if waves.dim() != 2:
            raise ValueError(f"LogMel expects waveforms of shape (clips, samples), got {tuple(waves.shape)}")
        # (N, 1, mels, frames): AmplitudeToDB floors a 4-D input at each clip's own max − 80 dB
        db = self.to_db(self.mel(waves).unsqueeze(1)).squeeze(1)
        db = db - db.amax(dim=(1, 2), keepdim=True)
        frames = db.size(-1)
        db = F.pad(db, (0, FRAMES - frames)) if frames < FRAMES else db[..., :FRAMES]
        mean = db.mean(dim=(1, 2), keepdim=True)
        std = db.std(dim=(1, 2), keepdim=True)
        return ((db - mean) / torch.where(std > 0, std, 1.0)).transpose(1, 2)


def read_wav(path, start=0, stop=None):
    """Mono float32 samples in [-1, 1) of a 16 kHz WAV file (soundfile: no FFmpeg needed)."""
    try:
        wave, rate = soundfile.read(path, start=start, stop=stop, dtype="float32")
    except RuntimeError as e:  # soundfile's LibsndfileError: missing, truncated or not a WAV file
        raise DataError(f"cannot read {path} ({e}); the extracted folder {path.parent.parent} may be damaged: "
                         f"delete it and run again, or fetch {URL} by hand") from None
    if rate != SAMPLE_RATE or wave.ndim != 1:
        raise DataError(f"{path}: expected 16 kHz mono, got {rate} Hz with shape {wave.shape}")
    wave = torch.from_numpy(wave)
    # torch's reflect padding of n_fft/2 needs more samples than that; pad the odd tiny clip with zeros
    if len(wave) <= MEL["n_fft"] // 2:
        wave = F.pad(wave, (0, MEL["n_fft"] // 2 + 1 - len(wave)))
    return wave


def fetch(folder, url=URL, sha256=SHA256):
    """The extracted dataset folder; downloads and extracts the archive first if it is not there."""
    target = folder / FOLDER
    if (target / "testing_list.txt").exists():
        return target
    archive = download(url, folder / ARCHIVE, sha256=sha256)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(partial, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{archive} is not a readable tar.gz archive ({e}): delete it and run again. "
                            f"{by_hand(url, archive)}") from None
    for name in ("validation_list.txt", "testing_list.txt"):
        if not (partial / name).exists():
            raise DataError(f"{archive} holds no {name}: not the Speech Commands archive. {by_hand(url, archive)}")
    os.replace(partial, target)  # the folder appears only once extraction is complete
    return target


def clip_list(root, split):
    """[(file, start, stop, label)] of one split; stop None = the whole file.

    The words of each split come from torchaudio's SPEECHCOMMANDS (the archive's list files);
    silence segments are added to training only.
    """
    dataset = torchaudio.datasets.SPEECHCOMMANDS(root, download=False, subset=SPLITS[split])
    clips = []
    for n in range(len(dataset)):
        relpath, _, word, _, _ = dataset.get_metadata(n)
        clips.append((root / "SpeechCommands" / relpath, 0, None, label_of(word)))
    if split == "train":
        for path in sorted((root / FOLDER / NOISE).glob("*.wav")):
            segments = soundfile.info(str(path)).frames // SAMPLE_RATE
            clips += [(path, i * SAMPLE_RATE, (i + 1) * SAMPLE_RATE, label_of(NOISE)) for i in range(segments)]
    return clips


def compute_features(clips, device="cpu", chunk=256):
    """(x, y): x (N, 126, 80) float16, y (N,) int64. Reads `chunk` clips at a time and transforms
    the clips of equal length together in one batch (padding the audio would change the result)."""
    logmel = LogMel().to(device)
    x = torch.empty(len(clips), FRAMES, MEL["n_mels"], dtype=torch.float16)
    with tqdm(total=len(clips), desc="log-mel features", unit="clip", disable=None) as bar:
        for first in range(0, len(clips), chunk):
            waves = [read_wav(path, start, stop) for path, start, stop, _ in clips[first:first + chunk]]
            by_length = {}
            for i, wave in enumerate(waves):
                by_length.setdefault(len(wave), []).append(i)
            for index in by_length.values():
                with torch.no_grad():
                    batch = logmel(torch.stack([waves[i] for i in index]).to(device))
                x[torch.tensor(index) + first] = batch.to("cpu", torch.float16)
            bar.update(len(waves))
    y = torch.tensor([label for *_, label in clips], dtype=torch.long)
    return x, y


def load_splits(data_dir, url=URL, sha256=SHA256, device="cpu"):
    """{'train': (x, y), 'valid': ..., 'test': ...} from the feature cache, made once (on device)."""
    root = Path(data_dir) / "speech_commands"
    params = {"archive": ARCHIVE, "sha256": sha256, "features": FEATURES, "classes": CLASSES}
    features = cached(root / "features.pt", lambda: extract_features(root, url, sha256, device), params=params,
                      notes=lambda f: {"device": str(device), "splits": counts(f)}, check=are_features)
    return {split: (f["x"], f["y"]) for split, f in features.items()}


def extract_features(root, url, sha256, device):
    """{split: {'x', 'y', 'clips'}} of every clip, fetching and extracting the archive if needed."""
    fetch(root, url, sha256)
    features = {}
    for split in SPLITS:
        clips = clip_list(root, split)
        x, y = compute_features(clips, device)
        names = [str(path.relative_to(root / FOLDER)) + (f"@{start}" if stop else "") for path, start, stop, _ in clips]
        features[split] = {"x": x, "y": y, "clips": names}
    return features


def are_features(features):
    """Whether a cache holds what extract_features makes: {split: {'x', 'y', 'clips'}}, one clip a row."""
    return set(features) == set(SPLITS) and all(
        isinstance(f["x"], torch.Tensor) and isinstance(f["y"], torch.Tensor) and len(f["x"]) == len(f["y"]) == len(f["clips"])
        for f in features.values())


def counts(features):
    """Clips per split and per class (the cache manifest's notes)."""
    per_class = {split: torch.bincount(f["y"], minlength=len(CLASSES)).tolist() for split, f in features.items()}
    return {split: {"clips": len(f["y"]), "per_class": dict(zip(CLASSES, per_class[split]))} for split, f in features.items()}


# clips per split: torchaudio's lists of the archive, and ~400 one-second silence segments (training)
SIZES = {"train": 84_843 + 400, "valid": 9_981, "test": 11_005}


def synthetic_splits(data_dir, url=URL, sha256=SHA256, device="cpu"):
    """What load_splits returns, for random features and labels of the real sizes."""
    g = torch.Generator().manual_seed(0)
    return {split: (torch.randn(n, FRAMES, MEL["n_mels"], dtype=torch.float16, generator=g),
                    torch.randint(0, len(CLASSES), (n,), generator=g)) for split, n in SIZES.items()}
