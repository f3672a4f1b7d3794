"""Load test: N concurrent clients x M requests against a REAL tritonserver on 127.0.0.1 (python-backend model).

    python -m iia.evaluation.triton_load ARTIFACT_DIR [--clients 16] [--requests 50] [--images 1]
                                       [--protocol grpc|http] [--max-queue-delay-us 2000] [--json FILE]

Exports ARTIFACT_DIR with iia-export-triton (python backend, KIND_CPU) into a temporary repository, starts
the nvidia-pytriton wheel's tritonserver bound to 127.0.0.1 on free ports (nothing else is contacted), and
reports: throughput (images/s), latency p50/p99, errors (must be 0), the batch sizes Triton's dynamic batcher
formed (server statistics), whether every output is bit-equal to the in-process `iia.runtime` for the same
noise, and the in-process runtime's images/s at the SAME batches (interleaved: after each round of load, the
in-process runtime, in its own clean process with the same ONNX Runtime threads, runs the very batch sizes
Triton formed in that round, as many times). On a shared machine
wall-clock rates swing with other load, so it also reports CPU time per image (server + backend stubs from
/proc, clients, in-process), which measures the serving overhead without that noise. Bounded: clients x requests requests, each with a timeout, and the
whole run with --timeout. Not a unit test: run it by hand (numbers in README "Serving").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import iia.runtime
from iia.cli import cli_parser
from iia.compiler.triton import TritonOptions, export_repository
from iia.runtime.contract import ORT_CPU

from .cli import check_json_file
from .triton_server import LocalTritonServer


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as client
    else:
        import tritonclient.http as client
    return client


def make_inputs(client, noise: np.ndarray, labels: np.ndarray | None):
    inputs = [client.InferInput("noise", list(noise.shape), "FP32")]
    inputs[0].set_data_from_numpy(noise)
    if labels is not None:
        inputs.append(client.InferInput("class_labels", [len(labels), 1], "INT64"))
        inputs[1].set_data_from_numpy(labels.reshape(-1, 1))
    return inputs


def batch_stats(client, model: str, protocol: str) -> dict[int, int]:
    """{batch size: executions} from Triton's model statistics."""
    stats = client.get_inference_statistics(model, as_json=True) if protocol == "grpc" else \
        client.get_inference_statistics(model)
    out: dict[int, int] = {}
    for entry in stats["model_stats"][0].get("batch_stats", []):
        out[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
    return out


def _inprocess_worker(conn, artifact: str, threads: int | None) -> None:
    """A separate, clean process (like a user's service) running the in-process runtime on request:
    receives {batch size: count}, replies (images, wall seconds, CPU seconds)."""
    sampler = iia.runtime.load(artifact, ORT_CPU, threads=threads)
    labels_for = (lambda n: np.arange(n) % sampler.label_dim) if sampler.conditional else (lambda n: None)
    rng = np.random.default_rng(12345)
    feeds: dict[int, tuple] = {}
    while True:
        batches = conn.recv()
        if batches is None:
            return
        for b in batches:
            if b not in feeds:  # warm each new batch size once (it may allocate)
                feeds[b] = (rng.standard_normal((b, *sampler.sample_shape), dtype=np.float32), labels_for(b))
                sampler(feeds[b][0], class_labels=feeds[b][1])
        cpu, start = time.process_time(), time.perf_counter()
        for b, count in batches.items():
            for _ in range(count):
                sampler(feeds[b][0], class_labels=feeds[b][1])
        conn.send((sum(b * n for b, n in batches.items()), time.perf_counter() - start, time.process_time() - cpu))


class InProcess:
    """The in-process baseline in its own spawned process (so the load test's client threads do not share it)."""

    def __init__(self, artifact, threads):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_inprocess_worker, args=(child, str(artifact), threads), daemon=True)
        self.process.start()

    def run(self, batches: dict[int, int]) -> tuple[int, float, float]:
        self.conn.send(dict(batches))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.process.join(30)


@dataclass
class _Load:
    """The requests of one load test and what came back; request k is client c's r-th (k = c x requests + r),
    sent in `rounds` (request indices r per round) that start at the `go` barrier and end at `done`."""

    noises: np.ndarray
    labels: list
    rounds: list[list[int]]
    go: threading.Barrier
    done: threading.Barrier
    deadline: float
    results: list = field(default_factory=list)
    latencies: np.ndarray = field(default_factory=lambda: np.zeros(0))
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _make_load(args, sampler) -> _Load:
    total = args.clients * args.requests
    label_dim = sampler.label_dim
    labels_fn = (lambda n: (np.arange(n) % label_dim).astype(np.int64)) if label_dim else (lambda n: None)
    rng = np.random.default_rng(args.seed)
    noises = rng.standard_normal((total, args.images, *sampler.sample_shape), dtype=np.float32)
    labels = [None if not label_dim else (labels_fn(args.images) + k) % label_dim for k in range(total)]
    rounds = [list(range(r * args.requests // args.rounds, (r + 1) * args.requests // args.rounds))
              for r in range(args.rounds)]
    return _Load(noises, labels, rounds, threading.Barrier(args.clients + 1), threading.Barrier(args.clients + 1),
                 time.monotonic() + args.timeout, [None] * total, np.zeros(total))


def _client(c: int, load: _Load, args, client_mod, url: str, model: str) -> None:
    """Client c: its requests of each round, one at a time; errors are counted (and the first ones reported)."""
    kwargs = {"client_timeout": args.request_timeout} if args.protocol == "grpc" else {}
    client = client_mod.InferenceServerClient(url, **({} if args.protocol == "grpc" else
                                                      {"network_timeout": args.request_timeout}))
    try:
        for ids in load.rounds:
            load.go.wait()
            for r in ids:
                k = c * args.requests + r
                if time.monotonic() > load.deadline:
                    with load.lock:
                        load.errors.append(f"request {k}: --timeout {args.timeout} s reached")
                    continue
                start = time.perf_counter()
                try:
                    out = client.infer(model, make_inputs(client_mod, load.noises[k], load.labels[k]), **kwargs)
                    load.results[k] = out.as_numpy("images")
                except Exception as err:  # counted, reported
                    with load.lock:
                        load.errors.append(f"request {k}: {type(err).__name__}: {err}")
                load.latencies[k] = time.perf_counter() - start
            load.done.wait()
    finally:
        client.close()


@dataclass
class _Tally:
    """Sums over the rounds: Triton's wall and CPU seconds, the in-process runtime's, the batches Triton formed."""

    triton_s: float = 0.0
    inproc_s: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    inproc_cpu: float = 0.0
    inproc_images: int = 0
    formed: dict = field(default_factory=dict)
    per_round: list = field(default_factory=list)


def _measure_rounds(load: _Load, args, server, main_client, model: str, inproc: InProcess) -> _Tally:
    """Each round: release the clients, wait for them, read the batches Triton formed, then have the in-process
    runtime run the same batches (or --effective-batch)."""
    tally = _Tally()
    for _ in load.rounds:
        before = batch_stats(main_client, model, args.protocol)
        cpu0, server0, t0 = time.process_time(), server.cpu_seconds(), time.perf_counter()
        load.go.wait()
        load.done.wait()
        wall = time.perf_counter() - t0
        tally.triton_s, tally.client_cpu = tally.triton_s + wall, tally.client_cpu + time.process_time() - cpu0
        tally.server_cpu += server.cpu_seconds() - server0
        after = batch_stats(main_client, model, args.protocol)
        round_formed = {b: after.get(b, 0) - before.get(b, 0) for b in after if after.get(b, 0) > before.get(b, 0)}
        for b, n in round_formed.items():
            tally.formed[b] = tally.formed.get(b, 0) + n
        made = sum(b * n for b, n in round_formed.items())
        same = ({args.effective_batch: max(1, round(made / args.effective_batch))} if args.effective_batch
                else round_formed)
        n, sec, cpu = inproc.run(same)
        tally.inproc_cpu += cpu
        tally.inproc_images, tally.inproc_s = tally.inproc_images + n, tally.inproc_s + sec
        tally.per_round.append({"triton_images_per_s": round(made / wall, 1), "batches_formed": round_formed,
                                "inprocess_images_per_s": round(n / sec, 1), "ratio": round(made / wall / (n / sec), 3)})
    return tally


def run(args) -> dict:
    """Rounds of load (every client sends requests/rounds requests), each followed by the in-process runtime
    running the very batches Triton formed in that round (or --effective-batch): both rates are sums over the
    same interleaved stretch of time, so a busy machine slows both."""
    artifact = Path(args.artifact)
    sampler = iia.runtime.load(artifact, ORT_CPU, threads=args.threads)
    client_mod = _client_module(args.protocol)
    load = _make_load(args, sampler)

    with tempfile.TemporaryDirectory(prefix="iia-loadtest-") as tmp:
        opts = TritonOptions(name="loadtest", kind="cpu", backends=["python"], instances=args.instances,
                             max_queue_delay_us=args.max_queue_delay_us, threads=args.threads)
        model = next(iter(export_repository(artifact, Path(tmp) / "repo", opts)))
        with LocalTritonServer(Path(tmp) / "repo", log=lambda t: print(t, file=sys.stderr)) as server:
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
            inproc = InProcess(artifact, args.threads)
            main_client = client_mod.InferenceServerClient(url)
            for k in range(3):  # warm the model instance
                main_client.infer(model, make_inputs(client_mod, load.noises[k], load.labels[k]))
            threads = [threading.Thread(target=_client, args=(c, load, args, client_mod, url, model), daemon=True)
                       for c in range(args.clients)]
            for t in threads:
                t.start()
            tally = _measure_rounds(load, args, server, main_client, model, inproc)
            for t in threads:
                t.join()
            main_client.close()
            inproc.close()
    return _report(args, artifact, model, load, tally, sampler)


def _report(args, artifact: Path, model: str, load: _Load, tally: _Tally, sampler) -> dict:
    total = args.clients * args.requests
    executions = sum(tally.formed.values())
    images_done = sum(b * n for b, n in tally.formed.items())
    ok = [k for k in range(total) if load.results[k] is not None]
    # the in-process runtime on each request's own noise and labels (the request as one batch)
    bit_equal = sum(np.array_equal(load.results[k], sampler(load.noises[k], class_labels=load.labels[k])) for k in ok)
    lat = load.latencies[ok] * 1e3 if ok else np.zeros(1)
    triton_rate = len(ok) * args.images / tally.triton_s
    inproc_rate = tally.inproc_images / tally.inproc_s
    server_cpu, client_cpu, inproc_cpu = tally.server_cpu, tally.client_cpu, tally.inproc_cpu
    per_round = tally.per_round
    return {
        "artifact": str(artifact), "model": model, "protocol": args.protocol, "clients": args.clients,
        "requests_per_client": args.requests, "images_per_request": args.images, "requests": total,
        "errors": len(load.errors), "first_errors": load.errors[:3], "triton_wall_s": round(tally.triton_s, 3),
        "cpu_s": {"triton_server": round(server_cpu, 2), "clients": round(client_cpu, 2),
                  "inprocess": round(inproc_cpu, 2)},
        "cpu_ms_per_image": {"triton_server": round(1e3 * server_cpu / max(1, len(ok) * args.images), 3),
                             "triton_server_and_clients": round(1e3 * (server_cpu + client_cpu)
                                                                / max(1, len(ok) * args.images), 3),
                             "inprocess": round(1e3 * inproc_cpu / max(1, tally.inproc_images), 3)},
        "triton_images_per_s": round(triton_rate, 1),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p90": round(float(np.percentile(lat, 90)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2)},
        "batches_formed": dict(sorted(tally.formed.items())), "executions": executions,
        "effective_batch": round(images_done / executions, 2) if executions else 0.0,
        "inprocess_images_per_s": round(inproc_rate, 1),
        "throughput_ratio": round(triton_rate / inproc_rate, 3),
        "round_ratios": {"median": round(float(np.median([r["ratio"] for r in per_round])), 3),
                         "min": min(r["ratio"] for r in per_round), "max": max(r["ratio"] for r in per_round)},
        "rounds": per_round,
        "bit_equal_responses": bit_equal, "max_queue_delay_us": args.max_queue_delay_us,
        "instances": args.instances, "threads": args.threads, "cpu_count": os.cpu_count(),
    }


def main(argv=None) -> int:
    parser = cli_parser(prog="python -m iia.evaluation.triton_load", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", metavar="ARTIFACT_DIR")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--images", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads, server instances and in-process alike (default: ORT's)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--effective-batch", type=int, default=None,
                        help="in-process batch to compare with (default: the batches Triton formed, replayed)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved Triton / in-process rounds (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for all requests")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.images, args.rounds) < 1 or args.clients * args.requests > 100_000:
        parser.error("--clients, --requests, --images, --rounds must be >= 1 (and clients x requests <= 100000)")
    if args.rounds > args.requests:
        parser.error(f"--rounds {args.rounds} exceeds --requests {args.requests}")
    try:  # before any work, as every command checks its report files (never inside an artifact)
        check_json_file(args.json)
    except ValueError as err:
        parser.error(str(err))
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"{report['requests']} requests from {report['clients']} clients: {report['errors']} errors, "
          f"{report['triton_images_per_s']} images/s through Triton vs {report['inprocess_images_per_s']} in-process "
          f"running the same batches (ratio {report['throughput_ratio']}, per-round median {report['round_ratios']['median']}, "
          f"effective batch {report['effective_batch']}); p50 "
          f"{report['latency_ms']['p50']} ms, p99 {report['latency_ms']['p99']} ms; batches formed "
          f"{report['batches_formed']}; bit-equal {report['bit_equal_responses']}/{report['requests']}",
          file=sys.stderr)
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
