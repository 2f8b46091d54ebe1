"""Shared by the bank, safety, evaluation and rule tests: small annotated cases, a hash stand-in
for DINOv2 (where the model is beside the point, e.g. in child processes), bank helpers."""
from __future__ import annotations

import argparse
import hashlib
import os
import textwrap
from pathlib import Path

import numpy as np

from RetrievalSegLib.bank.support_bank import LabelInfo, SupportBank
from RetrievalSegLib.cli.bank import add_bank_parser
from RetrievalSegLib.data.volume import Volume

REPO = Path(__file__).resolve().parents[1]


LABELS = [LabelInfo(1, "RV", (1.0, 0.0, 0.0)), LabelInfo(2, "Myo", (0.0, 1.0, 0.0))]


# A deterministic stand-in for SliceEmbedder: a unit vector seeded by the image bytes. Kept as
# source text so child processes use exactly the same class.
HASH_EMBEDDER_SRC = '''
import hashlib
import numpy as np

class HashEmbedder:
    def __init__(self, dim=16, name="dinov2-small:hash"):
        self.dim = dim
        self.identity = f"{name}@{dim}"

    def embed(self, images, progress=None):
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for n, img in enumerate(images):
            seed = int.from_bytes(hashlib.sha256(np.ascontiguousarray(img).tobytes()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[n] = v / np.linalg.norm(v)
        return out
'''


_ns: dict = {}


exec(HASH_EMBEDDER_SRC, _ns)


HashEmbedder = _ns["HashEmbedder"]


def make_case(seed: int, annotated=(2, 3, 5)) -> tuple[Volume, Volume]:
    """An int16 image with an oblique, anisotropic geometry and labels 1/2 on `annotated` slices."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 20, size=(8, 28, 32)).astype(np.int16)
    lab = np.zeros(img.shape, dtype=np.uint8)
    yy, xx = np.mgrid[:28, :32]
    for k in annotated:
        cy, cx = 14 + rng.integers(-3, 4), 16 + rng.integers(-3, 4)
        r = np.hypot(yy - cy, xx - cx)
        lab[k][r < 5] = 1
        lab[k][(r >= 5) & (r < 8)] = 2
        img[k][lab[k] == 1] += 300
        img[k][lab[k] == 2] += 150
    geometry = dict(
        spacing=(0.8, 0.9, 3.0),
        origin=(-10.5, 20.25, 5.0),
        direction=(0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    )
    return Volume(img, **geometry), Volume(lab, **geometry)


def new_bank(tmp_path: Path, embedder, name: str = "bank") -> SupportBank:
    return SupportBank.create(tmp_path / name, LABELS, embedder.identity)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


# ----------------------------------------------------------------------------- concurrency & crashes
CONCURRENT_CHILD = HASH_EMBEDDER_SRC + textwrap.dedent('''
import os, sys, time
real_replace = os.replace
def slow_replace(src, dst):  # widen every read-modify-write window
    time.sleep(0.02)
    return real_replace(src, dst)
os.replace = slow_replace
from RetrievalSegLib.bank.support_bank import SupportBank

bank_path, case, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(sum(case.encode()))
while not os.path.exists(go):
    time.sleep(0.005)
bank = SupportBank.open(bank_path)
for i in range(count):
    img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    bank.add_slice(img, {1: img > 128}, case, "k", i, (1.0, 1.0), HashEmbedder())
''')


def bank_cli():
    """`rseg bank ...` with the hash stand-in embedder (the model is beside the point here)."""
    parser = argparse.ArgumentParser(prog="rseg")
    add_bank_parser(parser.add_subparsers(dest="command"), lambda args: HashEmbedder())

    def rseg(*argv) -> int:
        args = parser.parse_args(["bank", *map(str, argv)])
        return args.func(args)

    return rseg


def filled_bank(root: Path, name: str = "bank", seed: int = 0) -> SupportBank:
    emb = HashEmbedder()
    bank = SupportBank.create(root / name, LABELS, emb.identity)
    bank.add_volume(*make_case(seed), "p01", emb)
    return bank


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every path under `folder` (links as their target, files as their bytes), without following links."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out


class FeatureHashEmbedder:
    """A stand-in for SliceEmbedder with its retrieval features: one unit vector per (slice, feature),
    seeded by the image bytes and the feature's name; identity and `embed_features` as the real one
    (cls adds nothing to the identity, cls+mean is twice as wide, an unknown feature is refused)."""

    FEATURES = ("cls", "mean", "cls+mean", "gem")

    def __init__(self, feature: str = "cls", width: int = 16, name: str = "dinov2-small:hash") -> None:
        if feature not in self.FEATURES:
            raise ValueError(f"retrieval feature must be one of {', '.join(self.FEATURES)}, got {feature!r}")
        self.feature, self.width, self.name = feature, width, name
        self.passes = 0  # calls that ran "the model" (one per embed / embed_features call)

    def identity_of(self, feature: str) -> str:
        base = f"{self.name}@{self.width}"
        return base if feature == "cls" else f"{base}#{feature}"

    @property
    def identity(self) -> str:
        return self.identity_of(self.feature)

    @property
    def dim(self) -> int:
        return self.width * (2 if self.feature == "cls+mean" else 1)

    def embed(self, images, progress=None):
        return self.embed_features(images, (self.feature,), progress)[self.feature]

    def embed_features(self, images, features, progress=None):
        self.passes += 1
        out = {}
        for feature in dict.fromkeys(features):
            if feature not in self.FEATURES:
                raise ValueError(f"retrieval feature must be one of {', '.join(self.FEATURES)}, got {feature!r}")
            width = self.width * (2 if feature == "cls+mean" else 1)
            rows = np.empty((len(images), width), dtype=np.float32)
            for n, img in enumerate(images):
                digest = hashlib.sha256(np.ascontiguousarray(img).tobytes() + feature.encode()).digest()
                v = np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(width)
                rows[n] = v / np.linalg.norm(v)
            out[feature] = rows
        if progress is not None:
            progress(len(images), len(images))
        return out
