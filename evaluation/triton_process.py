"""A local tritonserver's processes and files: free ports, why a start failed (its log), the processes of its
session, and what a server stopped early or a SIGKILLed wrapper leaves behind (work folders, backend stubs,
shared memory, the python backend's scratch folders). Standard library only; Linux /proc where it reads
processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int, taken: tuple[int, ...] = ()) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, none in `taken`.

    The sockets stay bound until all are chosen: one at a time, the OS may hand out a just-closed port again
    (CI saw HTTP and gRPC given the same port, and tritonserver refused to start).
    """
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in taken and port not in ports:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a server left running, another service)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM")  # a CPU-only host's start-up errors: not why it stopped


def failure_cause(log: str) -> str:
    """Why tritonserver did not start, in one line, from its log: each model's load failure ("model M version
    V: reason", the first line of the reason: a python-backend model's exception without its traceback), else its
    last error line, else the log's last line (a usage error: the log is then the option table)."""
    import re

    reasons = re.findall(r"failed to load '([^']+)' version (\d+): (.*?)(?:\\n|\"?$)", log, re.M)
    if reasons:
        return "; ".join(dict.fromkeys(f"model {name} version {v}: {why.strip()}" for name, v, why in reasons))
    errors = [m.strip().strip('"').strip() for m in re.findall(r"^E\d{4} [\d:.]+ +\d+ \S+\] (.*)$", log, re.M)
              if not any(word in m for word in _HARMLESS)]
    if errors:
        return errors[-1].split("\\n")[0]
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "(its log is empty)"


def session_stats(sid: int) -> dict[int, list[str]]:
    """{pid: the fields of /proc/pid/stat after "pid (comm)"} of the processes of session `sid` (Linux): the server
    and the backend stubs it started (fields: state ppid pgrp session ... utime stime at 11, 12)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:
            stats[int(entry)] = fields
    return stats


def remove_stale_work() -> None:
    """Remove what local servers whose wrapper process is gone left (a SIGKILLed wrapper cannot clean up, and its
    tritonserver died with it, `die_with_parent`): their work folders (backends copy, venv overlay, log), the
    backend stubs still running from them (a stub started while the server was loading outlives it, re-parented,
    ignoring SIGTERM) and those stubs' shared memory (the server's region prefix, iia-SUFFIX-)."""
    from iia.cli import pid_alive

    for folder in Path(tempfile.gettempdir()).glob("iia-triton-*-*"):
        owner = folder.name.split("-")[2]
        if not owner.isdigit() or pid_alive(int(owner)):
            continue
        for pid in processes_running_from(folder):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_shm(shm_prefix(folder))
        shutil.rmtree(folder, ignore_errors=True)


def shm_prefix(work: Path) -> str:
    """The python backend's shared-memory region prefix of the server whose work folder is `work` (iia-SUFFIX-,
    SUFFIX the folder's random part): its regions can be found, and removed, by their owner's folder."""
    return f"iia-{work.name.rsplit('-', 1)[-1]}-"


def remove_shm(prefix: str) -> None:
    """Unlink the /dev/shm regions named `prefix`*."""
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink(missing_ok=True)


def processes_running_from(folder: Path) -> list[int]:
    """The pids of this user's processes whose command line names a file under `folder` (Linux /proc)."""
    needle, pids = str(folder).encode() + b"/", []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes():
                pids.append(int(entry))
        except OSError:  # exited meanwhile, or another user's
            continue
    return pids


PYTHON_ENVS = "python_env_*"  # the python backend's scratch folders, always in /tmp (its path is built in)


def new_python_envs(before: set[str]) -> list[Path]:
    """The python backend's scratch folders in /tmp that were not in `before` (names)."""
    return [p for p in Path("/tmp").glob(PYTHON_ENVS) if p.name not in before]


def remove_python_envs(folders: list[Path]) -> None:
    """Remove those of `folders` that are empty: the python backend leaves its scratch folder behind when it is
    stopped while loading; one in use by another server (holding an extracted environment) is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux prctl PR_SET_PDEATHSIG),
    so that a SIGKILLed wrapper does not leave tritonserver holding its ports."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
