"""A real `tritonserver` on loopback, for tests and the load test: the binary of the `nvidia-pytriton` wheel.

That wheel (PyPI, installed `--no-deps`: its metadata pins numpy<2) ships Triton's `tritonserver` with the
Python backend only (no ONNX Runtime / TensorRT backends), so here it serves the python-backend model that
`iia-export-triton` writes; the standard-backend models need NVIDIA's Triton container (README "Serving").

What it takes to run (measured on Debian 12, see shared notes "Triton Inference Server"):
  * LD_LIBRARY_PATH = the wheel's `nvidia_pytriton.libs`;
  * a writable backends folder whose `python/` holds the wheel's `libtriton_python.so` and the
    `triton_python_backend_stub` built for this Python version (it links the system libpython3.X);
  * the stub runs Python ISOLATED (PYTHONPATH ignored) and takes its site-packages from the `python` first
    on PATH, and exchanges tensors correctly only with numpy < 2 there: `stub_environment()` makes (once,
    cached) a small venv with numpy<2 + onnxruntime, and each server gets a throw-away venv
    (`server_environment`) whose one .pth file names that cached venv and a folder holding only a link to this
    `iia` package (torch-free `iia.runtime`; the system site-packages with numpy 2 stay out), so the server
    works whatever directory it is started from;
  * HTTP, gRPC and metrics bound to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .triton_process import (die_with_parent, failure_cause, free_port, free_ports, new_python_envs, port_in_use,
                             remove_python_envs, remove_shm, remove_stale_work, session_stats, shm_prefix)

STUB_NUMPY = "numpy<2"


class TritonUnavailable(RuntimeError):
    """No usable tritonserver here; the message says what to install."""


def wheel_paths() -> dict[str, Path]:
    """Paths inside the installed nvidia-pytriton wheel (without importing pytriton, which needs pyzmq)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonUnavailable("tritonserver not found: pip install --no-deps nvidia-pytriton (the wheel ships the "
                                "server binary with the Python backend; see .ci/install-triton.sh)")
    pkg = Path(list(spec.submodule_search_locations)[0])
    server = pkg / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {"binary": server / "bin" / "tritonserver", "libs": pkg.parent / "nvidia_pytriton.libs",
             "backend": server / "backends" / "python",
             "stub": server / "python_backend_stubs" / version / "triton_python_backend_stub"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise TritonUnavailable(f"the nvidia-pytriton wheel lacks {', '.join(missing)} (Python {version} stub needed)")
    return paths


def stub_environment(cache_dir: str | Path | None = None, log=None) -> Path:
    """A venv (made once, cached) with numpy<2 + this host's onnxruntime version, for the python-backend stub."""
    import onnxruntime

    from iia.compiler.build import default_cache_dir

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = Path(cache_dir or default_cache_dir())
    env = root / f"triton-stub-py{version}-ort{onnxruntime.__version__}"
    if (env / "ok").is_file():
        return env
    root.mkdir(parents=True, exist_ok=True)
    if log:
        log(f"making the python-backend environment {env} (numpy<2, onnxruntime {onnxruntime.__version__})")
    work = Path(tempfile.mkdtemp(dir=root, prefix=".triton-stub-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(work)], check=True, capture_output=True)
        pip = [str(work / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        result = subprocess.run([*pip, STUB_NUMPY, f"onnxruntime=={onnxruntime.__version__}"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise TritonUnavailable(f"could not make the python-backend environment: pip said "
                                    f"{result.stderr.strip().splitlines()[-1:] or result.returncode}")
        (work / "ok").write_text("numpy<2, onnxruntime\n")
        try:
            os.rename(work, env)  # the venv's python resolves its site-packages relative to itself
        except OSError:
            if not (env / "ok").is_file():  # another process made it first: use theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return env


def iia_import_dir(parent: Path) -> Path:
    """parent/pythonpath holding only a link `iia` -> this iia package: iia.runtime without the host's site-packages."""
    import iia

    folder = parent / "pythonpath"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "iia").symlink_to(Path(iia.__file__).resolve().parent, target_is_directory=True)
    return folder


def _site_packages(env: Path) -> Path:
    return env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def server_environment(parent: Path, env: Path) -> Path:
    """parent/env: a throw-away venv (no pip, milliseconds) whose site-packages holds one .pth naming this `iia`
    (through `iia_import_dir`) and the cached stub environment `env` (numpy<2 + onnxruntime).

    The python-backend stub runs its interpreter ISOLATED (sys.flags.isolated: PYTHONPATH and the user site are
    ignored) but still reads the site-packages, and .pth files, of the `python` first on PATH; so with PATH at
    this venv's bin/ the stub imports `iia` wherever the server is started from, and the shared cached `env`
    never names one checkout."""
    import venv

    overlay = parent / "env"
    venv.EnvBuilder(symlinks=True, with_pip=False).create(overlay)
    lines = [str(iia_import_dir(parent)), str(_site_packages(env))]
    (_site_packages(overlay) / "iia-triton-stub.pth").write_text("\n".join(lines) + "\n")
    return overlay


class LocalTritonServer:
    """`tritonserver --model-repository REPO` on 127.0.0.1 with free ports; a context manager.

    `http_url` / `grpc_url` ("127.0.0.1:PORT") for tritonclient; the server log is `log_path`.
    Start raises TritonUnavailable (with the log's last lines) when it does not become ready in `timeout` s.
    """

    def __init__(self, repo: str | Path, *, env: Path | None = None, timeout: float = 120.0, log=None,
                 extra_args: list[str] | None = None, ports: tuple[int, int, int] = (0, 0, 0)):
        self.repo = Path(repo).resolve()
        self.ports = tuple(ports)  # HTTP, gRPC, metrics; 0: a free one
        self.paths = wheel_paths()
        self.env = env or stub_environment(log=log)
        self.timeout = timeout
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.work: Path | None = None
        self.python_envs: set[str] | None = None  # the python backend's scratch folders before this start

    def start(self) -> "LocalTritonServer":
        remove_stale_work()
        self.work = Path(tempfile.mkdtemp(prefix=f"iia-triton-{os.getpid()}-"))
        backends = self.work / "backends" / "python"
        shutil.copytree(self.paths["backend"], backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(self.paths["stub"], backends / "triton_python_backend_stub")
        chosen = iter(free_ports(self.ports.count(0), taken=self.ports))
        self.http_port, self.grpc_port, self.metrics_port = (port or next(chosen) for port in self.ports)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.paths["libs"]), env.get("LD_LIBRARY_PATH")]))
        overlay = server_environment(self.work, self.env)
        env["PATH"] = os.pathsep.join([str(overlay / "bin"), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(overlay)
        for name in ("PYTHONHOME", "PYTHONPATH"):
            env.pop(name, None)
        self.log_path = self.work / "tritonserver.log"
        # the python backend's shared-memory regions under a prefix of this server's, removed by cleanup()
        self.shm_prefix = shm_prefix(self.work)
        cmd = [str(self.paths["binary"]), "--model-repository", str(self.repo),
               "--backend-directory", str(self.work / "backends"),
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
               "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
               "--allow-sagemaker", "false", "--allow-vertex-ai", "false", "--exit-on-error", "true",
               *self.extra_args]
        self.python_envs = {p.name for p in new_python_envs(set())}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.work,
                                            start_new_session=True, preexec_fn=die_with_parent)
            # cwd: no stray `iia` folder on the stub's path
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the server and its backend stubs (its process session; Linux)."""
        stats = session_stats(self.process.pid) if self.process is not None else {}
        return sum(int(fields[11]) + int(fields[12]) for fields in stats.values()) / os.sysconf("SC_CLK_TCK")

    def _wait_ready(self) -> None:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise TritonUnavailable(f"tritonserver exited with status {self.process.returncode}: "
                                            f"{self.failure()}")
                try:
                    if client.is_server_ready() and self.process.poll() is None:  # ours, not one left running
                        return
                except Exception:  # not listening yet
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        raise TritonUnavailable(f"tritonserver not ready after {self.timeout:g} s (--timeout): "
                                f"{self.failure()}")

    def failure(self) -> str:
        """Why the server stopped, in one line (`failure_cause` of its log), with a copy of the log kept outside the
        work folder that cleanup() removes: 'CAUSE (its log: PATH)' (no copy named where it cannot be made)."""
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            log = ""
        try:
            fd, kept = tempfile.mkstemp(prefix="iia-tritonserver-", suffix=".log")
            os.close(fd)
            shutil.copyfile(self.log_path, kept)
        except OSError:
            return failure_cause(log)
        return f"{failure_cause(log)} (its log: {kept})"

    def stop(self) -> None:
        """SIGINT to the server's process group, SIGKILL after 30 s; then SIGKILL to what is left of its session
        (a backend stub outlives a server stopped while it loads, and ignores SIGINT/SIGTERM)."""
        if self.process is None:
            return
        sid = self.process.pid
        try:
            os.killpg(sid, signal.SIGINT if self.process.poll() is None else signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:  # the group is gone already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(sid, signal.SIGKILL)
            self.process.wait()
        for pid in session_stats(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        prefix = getattr(self, "shm_prefix", None)
        if prefix:
            remove_shm(prefix)
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work = None
        if self.python_envs is not None:  # left when it was stopped while loading
            remove_python_envs(new_python_envs(self.python_envs))
            self.python_envs = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


def _main(argv=None) -> int:
    from iia.cli import cli_parser

    parser = cli_parser(
        prog="python -m iia.evaluation.triton_server",
        description="Serve a model repository with the nvidia-pytriton wheel's tritonserver (CPU, Python backend "
                    "only) on 127.0.0.1 until Ctrl-C: the local recipe for models exported with "
                    "`iia-export-triton ... --kind cpu --backend python`.")
    parser.add_argument("repo", help="model repository (iia-export-triton --repo)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (0: a free one; default 8000)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port on 127.0.0.1 (0: a free one; default 8001)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="metrics port on 127.0.0.1 (0: a free one; default 8002)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the server to be ready (default 120)")
    args = parser.parse_args(argv)
    _check_ports({"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port})
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    repo = Path(args.repo)
    if not repo.is_dir():
        raise ValueError(f"{repo}: no such model repository (make one with iia-export-triton --repo)")
    _check_servable(repo)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    server = LocalTritonServer(repo, timeout=args.timeout, log=log,
                               ports=(args.http_port, args.grpc_port, args.metrics_port))
    _stop_on_signals()
    ready = False
    try:
        server.start()
        ready = True
        print(f"serving {server.repo}: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
              f"127.0.0.1:{server.metrics_port} (log {server.log_path}); Ctrl-C stops", flush=True)
        server.process.wait()
        raise TritonUnavailable(f"tritonserver exited with status {server.process.returncode}: "
                                f"{server.failure()}")
    except KeyboardInterrupt:
        print("tritonserver stopped" if ready else "tritonserver stopped before it was ready", file=sys.stderr)
        return 0
    finally:
        server.cleanup()


def _stop_on_signals() -> None:
    """SIGINT (Ctrl-C) and SIGTERM stop the server and its tritonserver process group, SIGINT even where it was
    inherited ignored (a background job of a non-interactive shell, a CI's `cmd &`: the server then outlived
    SIGINT). SIGTERM is a server's normal stop (exit 0), not run_cli's "terminated as the work completed"."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _check_ports(ports: dict[str, int]) -> None:
    """Each port in [0, 65535], the given ones distinct and free (a server left running would answer our readiness
    check and the new one would then exit), before any work; 0 picks a free one."""
    for flag, port in ports.items():
        if not 0 <= port <= 65535:
            raise ValueError(f"{flag} must lie in [0, 65535], got {port}")
    given = [(flag, port) for flag, port in ports.items() if port]
    for i, (flag, port) in enumerate(given):
        same = [other for other, p in given[:i] if p == port]
        if same:
            raise ValueError(f"{flag} {port}: {same[0]} is {port} too (each needs its own port; 0 picks a free one)")
        if port_in_use(port):
            raise ValueError(f"{flag} {port}: 127.0.0.1:{port} is in use (a server still running? pass 0 for a "
                             f"free port)")


def _check_servable(repo: Path) -> None:
    """Refuse, naming the model, what this CPU binary cannot load (it would exit with 'failed to load all models'),
    and a folder with no model (an iia artifact given instead of its repository serves nothing)."""
    from iia.compiler.triton import parse_config

    configs = sorted(repo.glob("*/config.pbtxt"))
    if not configs:
        what = "an iia artifact, not a model repository" if (repo / "manifest.json").is_file() else "no model in it"
        raise ValueError(f"{repo}: {what} (no MODEL/config.pbtxt); export one with iia-export-triton ARTIFACT "
                         f"--repo REPO --kind cpu --backend python and serve REPO")
    for path in configs:
        config = parse_config(path.read_text(), str(path))
        if config.backend != "python":
            raise ValueError(f"{path}: {config.platform or config.backend} model; this local server has the "
                             f"Python backend only (export with --kind cpu --backend python into its own --repo, "
                             f"or serve with NVIDIA's Triton container)")
        if any(group.kind == group.KIND_GPU for group in config.instance_group):
            raise ValueError(f"{path}: instance kind KIND_GPU; this local server is CPU-only (export with "
                             f"--kind cpu --backend python)")


def main(argv=None) -> int:
    from iia.cli import run_cli

    return run_cli(_main, argv)


__all__ = ["LocalTritonServer", "TritonUnavailable", "free_port", "free_ports", "stub_environment", "wheel_paths"]

if __name__ == "__main__":
    sys.exit(main())
