"""Start the real `tritonserver` bundled in the nvidia-pytriton wheel as a child process.

The wheel ships tritonserver with the Python backend and one backend stub per Python version;
the server needs a backend directory holding the backend and the stub that matches this
interpreter, the wheel's bundled libraries on LD_LIBRARY_PATH, and this environment's bin dir
first on PATH (so Python-backend models run with this venv's packages).

The server runs in its own process group with a parent-death signal, and a guard kills that
group (the Python-backend stubs) if this process dies (see child_process); stop() kills the group.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from orchestrator.adapters.child_process import (
    GroupGuard,
    foreign_listeners,
    port_problem,
    spawn,
    stop_process_group,
)
from orchestrator.adapters.child_process import free_port as free_port

#: environment variable read by the ONNX Runtime stage models (threads per session)
ORT_THREADS_ENV = "ORCH_ORT_INTRA_OP_THREADS"
LOG_TAIL_LINES = 60


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"


def remove_shm_regions(prefix: str) -> None:
    """Unlink the /dev/shm regions of the tritonserver started with `prefix` as its Python
    backend's shm-region-prefix-name; only once it and its stubs are gone (a SIGKILLed server's
    stubs cannot unlink them themselves)."""
    for region in SHM_DIR.glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


class TritonServerError(RuntimeError):
    """tritonserver could not be found, did not start, or died; the message holds its log tail."""


def pytriton_server_dir() -> Path:
    """`<site-packages>/pytriton/tritonserver` of the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / "tritonserver"
        if (candidate / "bin" / "tritonserver").is_file():
            return candidate
    raise TritonServerError("tritonserver not found: install nvidia-pytriton==0.7.0")


def prepare_backends(work_dir: Path, server_dir: Path | None = None) -> Path:
    """Copy the Python backend and this interpreter's stub into `work_dir/backends`."""
    server_dir = server_dir or pytriton_server_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"no Python backend stub for Python {version} in {server_dir}")
    backends = work_dir / "backends"
    python_backend = backends / "python"
    if python_backend.exists():
        shutil.rmtree(python_backend)
    shutil.copytree(server_dir / "backends" / "python", python_backend)
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    return backends


def python_library_dir() -> Path | None:
    """The folder holding this interpreter's shared libpython, if it has one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not soname:
        return None
    folder = Path(str(libdir))
    return folder if (folder / str(soname)).exists() else None


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log, preceded by its first error lines (Triton prints long
    status tables last, which can push the actual cause out of the tail)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    all_lines = text.splitlines()
    last = all_lines[-lines:]
    errors = [line[:1500] for line in all_lines[:-lines] if line.startswith("E")][:10]
    if errors:
        return "\n".join(["errors:", *errors, "...", "last lines:", *last])
    return "\n".join(last)


class TritonServer:
    """One tritonserver child process serving `repository`.

    Ports given as 0 are picked free at construction time. Use as a context manager, or call
    `start()`, `wait_ready()` and `stop()`.
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        work_dir: str | Path | None = None,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ort_threads: int | None = 1,
        log_verbose: int = 0,
        startup_timeout: float = 120.0,
    ) -> None:
        self.repository = Path(repository).resolve()
        self._own_work_dir = work_dir is None
        self.work_dir = Path(
            tempfile.mkdtemp(prefix="tritonserver-") if work_dir is None else work_dir
        ).resolve()
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.ort_threads = ort_threads
        self.log_verbose = log_verbose
        self.startup_timeout = startup_timeout
        self.log_path = self.work_dir / "tritonserver.log"
        # the Python backend's shared-memory regions are named after this prefix, so that stop()
        # can remove what a killed server leaves in /dev/shm (its stubs cannot, once SIGKILLed)
        self.shm_prefix = f"{SHM_PREFIX}{uuid.uuid4().hex[:12]}_"
        self._process: subprocess.Popen[bytes] | None = None
        self._guard: GroupGuard | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def command(self, backends: Path, server_dir: Path) -> list[str]:
        return [
            str(server_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    def environment(self, server_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        libs = server_dir.parent.parent / "nvidia_pytriton.libs"
        ld_path = [str(libs)]
        own_libpython = python_library_dir()
        if own_libpython is not None:
            # the stub must load this interpreter's libpython, not another build of 3.11 that
            # the loader would find first (extension modules need the matching symbols)
            ld_path.insert(0, str(own_libpython))
        if env.get("LD_LIBRARY_PATH"):
            ld_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld_path)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        venv = Path(sys.prefix)
        if venv != Path(sys.base_prefix):
            env["VIRTUAL_ENV"] = str(venv)
        if self.ort_threads is not None:
            env[ORT_THREADS_ENV] = str(self.ort_threads)
            env.setdefault("OMP_NUM_THREADS", str(self.ort_threads))
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        if self._process is not None:
            raise TritonServerError("tritonserver is already started")
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {self.repository} does not exist")
        server_dir = pytriton_server_dir()
        taken = [
            f"{name} port {port} {problem}"
            for name, port in self._ports()
            if (problem := port_problem("0.0.0.0", port)) is not None
        ]
        if taken:
            raise TritonServerError("tritonserver cannot start: " + "; ".join(taken))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = prepare_backends(self.work_dir, server_dir)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self._process = spawn(
                self.command(backends, server_dir),
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.environment(server_dir),
                cwd=self.work_dir,
            )
        except OSError as exc:
            self._close_log()
            raise TritonServerError(f"cannot run tritonserver: {exc}") from exc
        self._guard = GroupGuard(self._process.pid)

    def _ports(self) -> list[tuple[str, int]]:
        return [("gRPC", self.grpc_port), ("HTTP", self.http_port), ("metrics", self.metrics_port)]

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ownership_problem(self) -> tuple[str, bool] | None:
        """None when this server's own process listens on all its ports; else what is wrong and
        whether another process holds one of them."""
        process = self._process
        if process is None:
            return "tritonserver is not running", False
        for name, port in self._ports():
            others = foreign_listeners(process.pid, port)
            if others is None:
                continue
            if others:
                holders = ", ".join(h.describe() for h in others)
                return f"the {name} port {port} is held by {holders}, not this tritonserver", True
            return f"this tritonserver does not listen on its {name} port {port} yet", False
        return None

    def is_ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll /v2/health/ready; raise TritonServerError with the log tail on death or timeout."""
        process = self._process
        if process is None:
            raise TritonServerError("tritonserver was not started")
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            code = process.poll()
            if code is not None:
                if process is self._process:
                    self._close_log()
                raise TritonServerError(
                    f"tritonserver exited with code {code} before it was ready; log "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            if self.is_ready():
                # an answer may come from another server on our ports (one left running by a
                # killed parent): ready only when our own process holds all three
                problem = self.ownership_problem()
                if problem is None and process.poll() is None:
                    return
                if problem is not None and problem[1]:
                    message = f"{problem[0]}; log {self.log_path}:\n{tail(self.log_path)}"
                    self.stop()
                    raise TritonServerError(message)
            if time.monotonic() > deadline:
                message = (
                    f"tritonserver not ready after {timeout or self.startup_timeout:.0f} s; "
                    f"log {self.log_path}:\n{tail(self.log_path)}"
                )
                self.stop()
                raise TritonServerError(message)
            time.sleep(0.2)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path, lines)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code (None if never started)."""
        process = self._process
        if process is None:
            return None
        if self._guard is not None:
            self._guard.release()
            self._guard = None
        # Python-backend stubs live in the server's process group: none outlives it
        code = stop_process_group(process, timeout)
        self._process = None
        self._close_log()
        # the whole group is gone: nothing maps this server's regions any more
        remove_shm_regions(self.shm_prefix)
        return code

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
