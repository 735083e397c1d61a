"""Benchmarks: every number is a ratio of two things timed side by side in this run (DESIGN 9, issue 7).

    python -m bench --quick --json          # the JSON object is the last stdout line (times: docs/benchmarks.md)
    python -m bench                         # full run: + accuracy on 500 dev users, sweeps; writes docs/performance.md
    python -m bench --artifacts artifacts   # trained checkpoints (xcross/Tools over lora/Sports, lora/Electronics)
    OMP_NUM_THREADS=1 python -m bench --quick   # one thread (e.g. while another job holds the other core)
    python -m bench --smoke --json          # one round of every quick comparison: the harness end to end (tests)

Without `--artifacts` the checkpoints are freshly initialised on the real MiniLM (timing does not depend on trained
values; the accuracy keys then only measure agreement between backends: labelled so in the output).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from service.machine import describe, tune_malloc

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and requests, no sweeps")
    p.add_argument("--smoke", action="store_true",
                   help="--quick with one timed round everywhere and the smallest service burst: checks that every "
                        "key is produced (the test suite's run); its timings are single samples, not results")
    p.add_argument("--json", action="store_true", help="print every key as one JSON object on the last line")
    p.add_argument("--artifacts", type=Path, default=None, help="trained checkpoint root (default: random ones)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md",
                   help="report of a full run (with PNG plots beside it)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 5 quick, 11 full)")
    p.add_argument("--users", type=int, default=500, help="dev users for the accuracy comparison (full run)")
    p.add_argument("--threads", type=int, default=0, help="torch / ORT intra-op threads (default: torch's default)")
    p.add_argument("--no-service", action="store_true", help="skip the service comparisons")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick = True
        args.reps = args.reps or 1
    return args


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = Path(tempfile.mkdtemp(prefix="xcross-bench-"))  # checkpoints, ONNX files, the server's log
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    machine = describe(probe_load=True)
    machine.update({"threads": threads, "malloc_tuned": tune_malloc(), "torch": torch.__version__})
    contended = machine["busy_cores_before"] >= 0.5
    log(f"{machine['cpu']}: flags {' '.join(k for k, v in machine['flags'].items() if v)}; {threads} threads; "
        f"{machine['busy_cores_before']} cores busy with other work{' (CONTENDED)' if contended else ''}")
    reps = args.reps or (5 if args.quick else 11)

    from bench import forward, serving
    from bench.models import dev_requests, random_artifacts
    from model.backbone import load_backbone

    bb32, bb16, bbn = load_backbone("minilm"), load_backbone("minilm"), load_backbone("minilm")
    trained = args.artifacts is not None
    artifacts = args.artifacts.resolve() if trained else random_artifacts(work / "artifacts", bb32)
    shared3 = random_artifacts(work / "shared3", bb32, top_k=3, lora_layers={3, 4, 5})
    requests = dev_requests(bb32, max(reps, 8))
    native_bf16 = any(machine["flags"][f] for f in ("amx_bf16", "avx512_bf16"))
    if not native_bf16:
        log("no avx512_bf16 / amx_bf16: bf16 is emulated here (~6x slower than fp32), so the bf16 comparisons and "
            "the explorations are skipped (their keys are null)")
    setup = forward.Setup(bb32, bb16, bbn, artifacts, shared3, requests, threads, args.quick, work, native_bf16)
    keys: dict[str, Any] = {}
    log("forward comparisons (interleaved)")
    fwd, details = forward.run_suite(setup, reps)
    keys.update(fwd)
    log("accuracy")
    users = None if args.quick else dev_requests(bb32, args.users)
    keys.update(forward.accuracy(setup, details, users))
    keys["accuracy_model"] = "trained" if trained else "random (agreement between backends only)"
    report: dict[str, Any] = {"details": details}
    from bench import training

    log("training step vs inference forward (source LoRA" + (")" if args.quick else ", X-Cross, profiles)"))
    train_keys, report["training"] = training.run(reps=min(reps, 2) if args.quick else reps, bf16=native_bf16,
                                                  with_xcross=not args.quick, profile=not args.quick)
    keys.update(train_keys)
    torch.set_num_threads(threads)
    if not args.no_service:
        backend = "torch-bf16" if any(machine["flags"][f] for f in ("amx_bf16", "avx512_bf16")) else "torch"
        log(f"service vs raw forward ({backend})")
        engine = serving.bench_engine(artifacts, backend, threads)
        torch.set_num_threads(threads)
        keys.update(serving.cache_suite(engine, requests, reps))
        server = serving.Server(serving.server_env(artifacts, backend, threads), work / "server.log")
        try:
            server.wait_ready()
            clients, burst, per_round = (2, 3, 1) if args.smoke else (3, 5, 1) if args.quick else (4, 12, 2)
            svc, svc_details = serving.service_suite(engine, server, requests, reps, clients, burst, per_round)
            keys.update(svc)
            keys["service_backend"] = backend
            if not args.quick:
                log("throughput vs concurrency")
                report["concurrency"] = serving.concurrency_sweep(server, requests, [1, 2, 4, 8], per_client=3)
        finally:
            server.stop()
        report["service"] = svc_details
        engine.close()
    if not args.quick and native_bf16:
        from bench import explore

        log("explorations")
        report["explore"] = explore.run_all(setup, details, reps, log)
    keys["threads"], keys["contended"] = threads, contended
    keys["busy_cores_after"] = describe(probe_load=True)["busy_cores_before"]
    keys["seconds"] = time.perf_counter() - t_start
    keys["cpu"], keys["cpu_flags"] = machine["cpu"], {k: machine["flags"][k] for k in
                                                       ("amx_bf16", "amx_int8", "avx512_bf16")}
    print_table(keys)
    if not args.quick:
        from bench.report import write_report

        write_report(args.out, keys, machine, report, trained)
        log(f"wrote {args.out}")
    if args.json:
        print(json.dumps(keys, sort_keys=True, default=float))
    return 0


def print_table(keys: dict[str, Any]) -> None:
    for k in sorted(keys):
        v = keys[k]
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")


if __name__ == "__main__":
    sys.exit(main())
