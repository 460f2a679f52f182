"""Run ``python -m <module> <args>`` as a child forked from a warm interpreter: faster bad-input CLI cases.

Why: on CI's two cores a bad-input case of ``lmexp.train`` takes ~15 s, of which ~12 s is importing torch,
Lightning and torchmetrics before the one-line error. :class:`Zygote` is a server process (one per pytest
worker) that imports them once; for each command it forks a child that sets the command's working
directory, environment, argv and stdout/stderr files, then runs the module as ``__main__`` (runpy) and exits
with its status. The child is a real process (its own pid, file descriptors, exit status, signal handling);
only the imports are shared. Each entry point keeps real ``subprocess`` cases next to the forked ones
(tests/test_cli.py compares the two on the same bad input).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER = r"""
import atexit, io, json, os, runpy, sys, traceback
import lightning.pytorch, torchmetrics, hydra, omegaconf  # the slow imports, once
protocol = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDONLY)
print(json.dumps({"ready": os.getpid()}), file=protocol, flush=True)
for line in sys.stdin:
    request = json.loads(line)
    sys.stdout.flush(), sys.stderr.flush(), protocol.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            protocol.close()
            os.dup2(null, 0)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(target, fd)
                os.close(target)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = [request["module"], *request["args"]]
            try:
                runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    code = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)  # as the interpreter reports a non-int exit
            except BaseException:
                traceback.print_exc()
            atexit._run_exitfuncs()  # what a normal interpreter exit runs (logging.shutdown, ...)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    print(json.dumps({"pid": pid}), file=protocol, flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), file=protocol, flush=True)
"""


class Zygote:
    """A warm interpreter serving one command at a time (see the module docstring)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a test's Ctrl-C or kill does not reach the server
        )
        self._pending = b""  # read from the server, not yet a whole line
        if self._read(timeout=300) is None:  # {"ready": pid}: the imports are done
            raise RuntimeError("the zygote server did not start within 300 s")

    def _read(self, timeout: float) -> dict | None:
        """The server's next protocol line, or None when ``timeout`` seconds pass first. Reads the pipe
        unbuffered: a second line already read must not wait for select() to report the pipe again."""
        deadline, fd = time.monotonic() + timeout, self.process.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise RuntimeError(f"the zygote server (pid {self.process.pid}) exited")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def run(
        self, args: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess:
        """``python -m args[0] args[1:]`` in ``cwd`` with ``env``, like ``subprocess.run(capture_output=True,
        text=True, timeout=timeout)``."""
        with tempfile.TemporaryDirectory(prefix="zygote-") as scratch:
            out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
            request = {"module": args[0], "args": args[1:], "cwd": str(cwd), "env": env}
            line = json.dumps({**request, "stdout": str(out), "stderr": str(err)}) + "\n"
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            reply = self._read(timeout)
            if reply is None:  # the server has not reaped the child yet, so its pid is still the child's
                os.kill(pid, signal.SIGKILL)
                self._read(timeout=60)
                raise subprocess.TimeoutExpired([sys.executable, "-m", *args], timeout)
            stdout, stderr = (path.read_text(errors="replace") for path in (out, err))
        return subprocess.CompletedProcess([sys.executable, "-m", *args], reply["status"], stdout, stderr)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
