"""Members of a source archive are copied into the cache once; a missing member is a one-line error."""

import io
import tarfile

import pytest

from edgecloud.errors import UserError
from edgecloud.sdist import extract_members, fetch_sdist


def _tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_extract_once_and_missing_member(tmp_path):
    sd = tmp_path / "pkg-1.0.tar.gz"
    _tar(sd, {"pkg-1.0/data/a.csv": b"x,y\n"})
    out = extract_members(sd, {"pkg-1.0/data/a.csv": "a.csv"}, tmp_path / "cache")
    assert out["a.csv"].read_bytes() == b"x,y\n"
    sd.write_bytes(b"")  # already extracted: the archive is not read again
    assert extract_members(sd, {"pkg-1.0/data/a.csv": "a.csv"}, tmp_path / "cache")["a.csv"].exists()
    _tar(sd, {"pkg-1.0/data/a.csv": b""})
    with pytest.raises(UserError, match="delete the file and retry"):
        extract_members(sd, {"pkg-1.0/data/b.csv": "b.csv"}, tmp_path / "cache")
    assert not (tmp_path / "cache" / "b.csv").exists()


def test_present_sdist_is_not_downloaded(tmp_path):
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"here")
    assert fetch_sdist("pkg", "pkg-1.0.tar.gz", tmp_path, "test").read_bytes() == b"here"
