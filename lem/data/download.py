"""Downloads every experiment shares: streamed with a tqdm bar, resumed after an interruption
(HTTP Range on the .part file), retried, checksummed, and renamed into place atomically; and
extraction of only the members needed from a zip archive, CRC-checked. Failures raise
lem.data.DataError saying where to get the file by hand."""
import os
import shutil
import time
import zipfile
import zlib
from pathlib import Path

import requests
from tqdm import tqdm

from .cache import DataError, file_digest


def by_hand(url, path):
    return f"Download {url} by hand and place it at {path} (folder {Path(path).parent})."


def download(url, path, sha256=None, md5=None, retries=4, timeout=60, chunk_size=1 << 20):
    """Fetch url into path unless a file with the right checksum is already there. Returns path.

    A partial download is kept as <path>.part and continued on the next try or call; the file
    appears under its final name only once complete and verified.
    """
    path = Path(path)
    expected = ("sha256", sha256) if sha256 else ("md5", md5) if md5 else None
    if path.exists() and (expected is None or file_digest(path, expected[0]) == expected[1]):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    error = None
    for attempt in range(retries):
        try:
            _fetch(url, part, timeout, chunk_size)
            break
        except requests.HTTPError as e:
            status = e.response.status_code
            if 400 <= status < 500 and status not in (408, 429):
                raise DataError(f"{url} answered HTTP {status}. {by_hand(url, path)}") from None
            error = e
        except (requests.RequestException, OSError, DataError) as e:
            error = e
        if attempt + 1 < retries:
            time.sleep(min(2 ** attempt, 30) * 0.5)
    else:
        raise DataError(f"could not download {url} after {retries} tries ({error}). {by_hand(url, path)}")
    if expected is not None:
        algorithm, digest = expected
        actual = file_digest(part, algorithm)
        if actual != digest:
            part.unlink()
            raise DataError(f"{algorithm} of the file downloaded from {url} is {actual}, expected {digest}; "
                                f"the file was removed. {by_hand(url, path)}")
    os.replace(part, path)
    return path


def _fetch(url, part, timeout, chunk_size):
    """One try: continue <part> from its current size (or start it), to the end of the resource."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, not of a gzip of it
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, stream=True, headers=headers, timeout=timeout) as r:
        if r.status_code == 416 and have:  # nothing left to fetch, if the .part is whole
            whole = r.headers.get("Content-Range", "").rpartition("/")[2]
            if whole.isdigit() and int(whole) == have:
                return
            part.unlink()
            raise DataError(f"{part} holds {have} bytes, more than the file's {whole or 'unknown size'}: removed")
        r.raise_for_status()
        if have and r.status_code != 206:  # the server ignored the Range header: start over
            have = 0
        length = r.headers.get("Content-Length")
        total = int(length) + have if length is not None else None
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=None) as bar:
            for block in r.iter_content(chunk_size):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"connection closed at {size} of {total} bytes")


def extract(zip_path, members, dest, url=None):
    """Extract only `members` of a zip archive into dest, each under its base name. Returns paths.

    A member is named by its path in the archive or by its ending (e.g. 'X/X_TRAIN.ts' matches
    'Archive/X/X_TRAIN.ts'). Every byte read is CRC-checked; a corrupt archive is removed
    (it is re-fetched on the next run) and reported with where to get it by hand.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    where = by_hand(url, zip_path) if url else f"Place a good copy at {zip_path}."
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            names = archive.namelist()
            paths = []
            for member in members:
                found = [n for n in names if n == member or n.endswith("/" + member)]
                if len(found) != 1:
                    raise DataError(f"{zip_path} holds {len(found)} entries named {member!r}, expected one. {where}")
                paths.append(_extract_member(archive, found[0], dest / Path(found[0]).name))
            return paths
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        zip_path.unlink(missing_ok=True)
        raise DataError(f"{zip_path} is not a valid zip archive ({e}); it was removed. {where}") from None


def _extract_member(archive, name, target):
    tmp = target.with_name(target.name + ".part")
    try:
        with archive.open(name) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)  # raises BadZipFile on a CRC mismatch
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target
