"""`iterdpo` and `python` for the bash scripts the tests run as a user would (every `--help` example, the README's
blocks, a dataset card's rebuild script), without a fresh interpreter per command.

A fresh `iterdpo` that trains, generates or ranks spends most of its life importing torch, transformers and TRL
(6-10 s on 2 busy cores, more than the tiny models' work). The server imports them once and forks a child per
command; the child takes the caller's stdin, stdout, stderr (passed over the socket), working directory,
environment and arguments, runs `python -m builders.cli ARGS` (or `-c CODE`, `-m MODULE`, `SCRIPT`) as that
interpreter would, and its exit status is the command's. Each command is still a process of its own (what one
command leaves in memory, the next never sees), run by a real bash with its own arguments, pipes, redirections
and variables; only the imports come ready-made. Anything else (`python` with other flags) runs a real python.

    python -m tests.forkserver serve @NAME       # the server (`shims` starts it: tests/conftest.py:shell_bin)
    python -S -E tests/forkserver.py @NAME ARGS  # a client: the shims `iterdpo` and `python` run this
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# imported by the server before it forks: what the commands of the examples import (lazily) and take long to
PRELOAD = (
    "builders.cli",
    "torch",
    "transformers",
    "trl",
    "datasets",
    "pyarrow",
    "duckdb",
    "builders.generate",
    "builders.rank",
    "builders.pairs",
    "builders.train",
    "builders.publish",
    "builders.publish_model",
    "builders.evaluate",
    "builders.tiny",
    "builders.backends.transformers",
    "builders.gguf",
    "cards.card",
)
# names of the heavy classes, so their lazy modules load too (transformers and trl import on attribute access)
PRELOAD_ATTRS = {
    "transformers": ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig", "Trainer"),
    "trl": ("DPOConfig", "DPOTrainer"),
}


def _address(name: str) -> str:
    """A socket in Linux's abstract namespace ("@name"): no file, and no limit of 107 bytes on a deep TMPDIR."""
    return "\0" + name[1:] if name.startswith("@") else name


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# ---------------------------------------------------------------------------------------------------------- client
def client(path: str, argv: list[str]) -> int:
    if not (len(argv) >= 2 and argv[0] in ("-c", "-m")) and not (argv and not argv[0].startswith("-")):
        os.execv(sys.executable, [sys.executable, *argv])  # a form the server does not run: a real python
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(_address(path))
    socket.send_fds(sock, [b"x"], [0, 1, 2])
    body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    sock.sendall(struct.pack("!i", len(body)) + body)  # then silence: the server reads our end as our death
    head = _recv_exact(sock, 4)
    if head is None:
        print("forkserver: no answer", file=sys.stderr)
        return 1
    (pid,) = struct.unpack("!i", head)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # what is sent to the command reaches it
        signal.signal(sig, lambda n, _frame: os.kill(pid, n))
    status = _recv_exact(sock, 4)
    if status is None:
        print("forkserver: the command's status was lost", file=sys.stderr)
        return 1
    code = os.waitstatus_to_exitcode(struct.unpack("!i", status)[0])
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


# ---------------------------------------------------------------------------------------------------------- server
def _run(argv: list[str]) -> int:
    """What `python ARGV` would do, in this (forked) interpreter; its exit status."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv, sys.path[0] = ["-c", *argv[2:]], os.getcwd()
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - as the interpreter: the traceback, status 1
        traceback.print_exc()
        return 1


def _child(request: dict, fds: list[int]) -> None:
    import atexit
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    code = _run(request["argv"])
    try:
        threading._shutdown()  # non-daemon threads end first, as at a normal interpreter exit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        module = importlib.import_module(name)
        for attr in PRELOAD_ATTRS.get(name, ()):
            getattr(module, attr)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(_address(path))
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> its client's connection

    def stop(_signum, _frame):  # the fixture's teardown: no command outlives the server
        for pid in waiting:
            os.kill(pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener, *waiting.values()], [], [], 0.05)
        for pid, conn in list(waiting.items()):
            if conn in ready:  # a client says nothing after its request: this is its end (killed by a timeout)
                os.kill(pid, signal.SIGKILL)
        if listener in ready:
            conn, _ = listener.accept()
            _, fds, _, _ = socket.recv_fds(conn, 1, 3)
            (size,) = struct.unpack("!i", _recv_exact(conn, 4))
            body = _recv_exact(conn, size)
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                listener.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                _child(json.loads(body), fds)
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("!i", pid))
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(struct.pack("!i", status))
                except OSError:  # the client is gone (killed by a timeout)
                    pass
                conn.close()


@contextlib.contextmanager
def shims(folder: Path, env: dict[str, str]) -> Iterator[Path]:
    """`folder` with the shims `iterdpo` and `python`, served by a server started with `env` (libraries that read
    the environment when imported, as huggingface_hub reads HF_HOME, see this one), stopped when the block ends."""
    sock = f"@iterdpo-forkserver-{os.getpid()}-{os.urandom(6).hex()}"
    here = Path(__file__).resolve()
    with (folder / "server.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", "serve", sock],
            cwd=here.parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the fork server did not start: {(folder / 'server.log').read_text()[-3000:]}")
            client = f'"{sys.executable}" -S -E "{here}" "{sock}"'
            for name, args in (("iterdpo", "-m builders.cli "), ("python", "")):
                (folder / name).write_text(f'#!/bin/sh\nexec {client} {args}"$@"\n')
                (folder / name).chmod(0o755)
            yield folder
        finally:
            server.terminate()  # it kills the commands still running, then itself
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
