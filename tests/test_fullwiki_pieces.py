"""benchmarks/quality/fullwiki_pieces.sh and fullwiki_unpack.sh on a tiny fake corpus: the pieces respect the
size limit, carrying them one call at a time (in any order, repeated) rebuilds files equal to the originals,
and a corrupt piece or one from another build is refused."""

from __future__ import annotations

import bz2
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIECES = ROOT / "benchmarks" / "quality" / "fullwiki_pieces.sh"
UNPACK = ROOT / "benchmarks" / "quality" / "fullwiki_unpack.sh"

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("bash", "xz", "tar", "split", "sha256sum", "bzip2")),
    reason="needs bash, xz, tar, split, sha256sum, bzip2")


def _corpus(root: Path, seed: int = 0) -> dict[str, bytes]:
    """WikiExtractor-like bz2 files (random words: they do not compress away); returns the decompressed text by
    the path the unpacked tree will have."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    texts = {}
    for rel in ("part1/AA/wiki_00.bz2", "part1/AA/wiki_01.bz2", "part1/AB/wiki_00.bz2", "part2/AA/wiki_00.bz2"):
        body = " ".join(rng.choice(words) for _ in range(2500))
        text = f'<doc id="1" url="?curid=1" title="T">\nT\n\n{body}\n</doc>\n'.encode()
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bz2.compress(text))
        texts[rel.removesuffix(".bz2")] = text
    return texts


def _run(script: Path, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fullwiki")
    texts = _corpus(tmp / "src")
    out = tmp / "pieces"
    proc = _run(PIECES, tmp, {"KIND": "text", "SRC": str(tmp / "src"), "OUT": str(out), "PIECE_BYTES": "12000",
                              "XZ_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return tmp, out, texts, proc.stdout


def _carry(tmp: Path, out: Path, index: int, call: str) -> Path:
    """A fake device checkout holding only scratch/fullwiki-pieces/piece<index>."""
    pieces = tmp / call / "scratch" / "fullwiki-pieces"
    pieces.mkdir(parents=True)
    shutil.copytree(out / f"piece{index}", pieces / f"piece{index}")
    return pieces


def test_pieces_and_carry_list(built):
    _, out, _, stdout = built
    pieces = sorted(out.glob("piece*"))
    assert len(pieces) >= 3
    for piece in pieces:
        (part,) = piece.glob("fullwiki.tar.xz.part*")
        assert part.stat().st_size <= 12000
        assert (piece / "MANIFEST").read_text() == (out / "MANIFEST").read_text()
    assert not (out / "fullwiki.tar.xz").exists() and not (out / "stage").exists()
    for i in range(1, len(pieces) + 1):
        assert f"call {i} carry: \"{out}/piece{i}\"" in stdout


def test_unpack_in_any_order_and_repeated(built, tmp_path):
    tmp, out, texts, _ = built
    n = len(list(out.glob("piece*")))
    dest = tmp_path / "dev-tmp" / "fullwiki"
    order = [n, 1, 1] + list(range(2, n - 1))  # the last piece first, one piece twice; n - 1 comes last
    for call, index in enumerate(order):
        env = {"FULLWIKI_PIECES": str(_carry(tmp_path, out, index, f"call{call}")), "FULLWIKI_DIR": str(dest)}
        proc = _run(UNPACK, tmp_path, env, "--need-complete")
        assert proc.returncode == 1, proc.stderr + proc.stdout
        assert "complete: no" in proc.stdout
    assert f"pieces present: {n - 1} of {n}" in proc.stdout
    assert "piece 1: already present" in _run(UNPACK, tmp_path, {
        "FULLWIKI_PIECES": str(tmp_path / "call1" / "scratch" / "fullwiki-pieces"), "FULLWIKI_DIR": str(dest)}).stdout
    env = {"FULLWIKI_PIECES": str(_carry(tmp_path, out, n - 1, "last")), "FULLWIKI_DIR": str(dest)}
    proc = _run(UNPACK, tmp_path, env, "--need-complete")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "complete: yes" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"WIKI={dest}/wiki"
    for rel, text in texts.items():
        assert (dest / "wiki" / rel).read_bytes() == text
    assert sorted(p.relative_to(dest / "wiki").as_posix() for p in (dest / "wiki").rglob("*") if p.is_file()) \
        == sorted(texts)
    assert not list((dest / "parts").iterdir())  # the pieces are dropped once extracted
    again = _run(UNPACK, tmp_path, {"FULLWIKI_PIECES": str(tmp_path / "none"), "FULLWIKI_DIR": str(dest)},
                 "--need-complete")
    assert again.returncode == 0 and "complete: yes" in again.stdout and "extracted" not in again.stdout


def test_unpack_refuses_corrupt_and_foreign_pieces(built, tmp_path):
    tmp, out, _, _ = built
    dest = tmp_path / "fullwiki"
    pieces = _carry(tmp_path, out, 1, "bad")
    (part,) = (pieces / "piece1").glob("fullwiki.tar.xz.part*")
    data = bytearray(part.read_bytes()); data[100] ^= 1; part.write_bytes(bytes(data))
    proc = _run(UNPACK, tmp_path, {"FULLWIKI_PIECES": str(pieces), "FULLWIKI_DIR": str(dest)})
    assert proc.returncode == 2 and "sha256" in proc.stderr
    assert not list((dest / "parts").iterdir())

    other = tmp_path / "other-pieces"  # another build (other text) must not mix with this one
    _corpus(tmp_path / "other-src", seed=1)
    built_other = _run(PIECES, tmp_path, {"KIND": "text", "SRC": str(tmp_path / "other-src"), "OUT": str(other),
                                          "PIECE_BYTES": "12000", "XZ_LEVEL": "0"})
    assert built_other.returncode == 0, built_other.stderr
    good = _carry(tmp_path, out, 1, "good")
    assert _run(UNPACK, tmp_path, {"FULLWIKI_PIECES": str(good), "FULLWIKI_DIR": str(dest)}).returncode == 0
    proc = _run(UNPACK, tmp_path, {"FULLWIKI_PIECES": str(other), "FULLWIKI_DIR": str(dest)})
    assert proc.returncode == 2 and "remove" in proc.stderr
