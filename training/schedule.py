"""`python -m training all`: the whole offline pipeline as a job graph, run by N worker processes, resumable.

Every job is one CLI command (`python -m training <command> ... --preset P --quiet`), "done" when its result file
exists (and, for a LoRA or X-Cross job given the checkpoint root, its checkpoint's manifest: a checkout that kept
results/ but not the ignored artifacts re-exports the checkpoint from its finished state), and started only
when the jobs it needs are done. Long jobs are started with `--resume`, so running
`all` again after a kill (or in the next session) skips what finished and continues what did not. Each worker is
a subprocess with its own thread count (on 2 cores: 2 workers x 1 thread beat 1 worker x 2 threads, and two
2-thread processes thrash; docs/training.md). Logs go to logs/<job>.log.

Order = priority: source LoRAs, the zero-shot matrix (split by row), X-Cross for every target, the baselines,
the ablations, the low-data curves, then the report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from training.data import DOMAINS

STAGES = ("floor", "lora", "zero-shot", "xcross", "baselines", "ablations", "low-data", "variants", "report")
GCA_OPTIONS = [(act, ln) for act in ("sigmoid", "tanh") for ln in ("ln", "noln")]
ABLATIONS = {  # paper Table 4, as train-xcross options
    # the paper's text (sec. 4.5): beta = gamma = 0, the streams combined only at the final stage (eq. 6); the same
    # function as integrating no layer, which skips the integrators' work (tests/model/test_xcross.py)
    "minus-layers": ["--top-k", "0"],
    "minus-interactions": ["--gamma", "0"],
    "minus-experts": ["--beta", "0"],  # the paper's definition (sec. 4.4): beta = 0, gamma = 0.4, both streams
}


@dataclass
class Job:
    name: str
    args: list[str]  # after `python -m training`
    done: list[Path]  # all exist = finished
    needs: list[str] = field(default_factory=list)
    after_all: bool = False  # start once every other job has finished, whatever its outcome (the report)

    def finished(self) -> bool:
        return all(p.exists() for p in self.done)


def plan(preset: str, results: Path, targets: tuple[str, ...] = DOMAINS, stages: tuple[str, ...] = STAGES,
         ablation_targets: tuple[str, ...] = DOMAINS, low_data_targets: tuple[str, ...] = ("Tools", "Toys"),
         extra: list[str] | None = None, variant_targets: tuple[str, ...] = ("Tools", "Toys"),
         hybrid_cap: int = 2000, joint_cap: int = 1500, artifacts: Path | None = None) -> list[Job]:
    """The job graph for a preset; `stages` selects what is run (dependencies outside it must already be done).
    With `artifacts`, a source LoRA or X-Cross job is done only when its checkpoint is there too."""
    extra = extra or []
    r = results

    def ckpt(kind: str, domain: str) -> list[Path]:
        return [artifacts / kind / domain / "manifest.json"] if artifacts is not None else []
    jobs: list[Job] = []

    def add(stage: str, name: str, args: list[str], done: list[Path], needs: list[str] = ()) -> None:
        if stage in stages:
            jobs.append(Job(name, [*args, "--preset", preset, "--quiet", *extra], done, list(needs)))

    for d in DOMAINS:
        add("floor", f"floor-{d}", ["floor", "--domain", d], [r / f"floor-{d}.json"])
    for d in DOMAINS:
        add("lora", f"lora-{d}", ["train-lora", "--domain", d, "--resume"],
            [r / f"lora-{d}-{preset}.json", *ckpt("lora", d)])
    rows = [f"zero-shot-{s}" for s in DOMAINS]
    for s in DOMAINS:
        # a row is one source's LoRA on every target's users: it needs only that LoRA, so rows start while the
        # slowest LoRA is still training
        add("zero-shot", f"zero-shot-{s}", ["zero-shot", "--rows", s],
            [r / "zero_shot" / f"{s}-on-{t}.json" for t in DOMAINS], [f"lora-{s}"])
    add("zero-shot", "zero-shot", ["zero-shot"], [r / "zero_shot.json"], rows)

    def other_rows(t: str) -> list[str]:  # a target's sources are chosen from the other domains' rows only
        return [f"zero-shot-{s}" for s in DOMAINS if s != t]

    for t in targets:
        add("xcross", f"xcross-{t}", ["train-xcross", "--target", t, "--resume"],
            [r / f"xcross-{t}-{preset}.json", *ckpt("xcross", t)], other_rows(t))
    for t in targets:
        add("baselines", f"mean-{t}", ["mean-lora", "--target", t], [r / f"mean-{t}-{preset}.json"], other_rows(t))
        add("baselines", f"pooler-scorer-{t}",
            ["train-xcross", "--target", t, "--n-sources", "1", "--head-only", "--name", "pooler-scorer", "--resume"],
            [r / f"pooler-scorer-{t}-{preset}.json"], other_rows(t))
    for t in ablation_targets:
        for name, opts in ABLATIONS.items():
            add("ablations", f"{name}-{t}", ["train-xcross", "--target", t, *opts, "--name", name, "--resume"],
                [r / f"{name}-{t}-{preset}.json"], other_rows(t))
    for t in low_data_targets:
        add("low-data", f"low-data-{t}", ["low-data", "--target", t], [r / f"low_data-{t}.json"], ["zero-shot"])
    v = "variants-"  # issue 8 (training/variants.py); caps keep each hybrid / joint LoRA near 4,000-4,500 users
    for t in variant_targets:
        names = []
        for name, args, done in (
            ("weaverec", ["train-weaverec", "--cap", str(hybrid_cap), "--learn-lambda"],
             [f"{v}weaverec-{t}-{preset}.json", f"{v}weaverec-learned-{t}-{preset}.json"]),
            ("merge-sources", ["merge-sources"], [f"{v}merge-sources-{t}-{preset}.json"]),
            ("joint", ["train-joint", "--cap", str(joint_cap)], [f"{v}joint-{t}-{preset}.json"]),
            *((f"gca-{act}-{ln}", ["train-gca", "--act", act, f"--{ln.replace('noln', 'no-ln')}"],
               [f"{v}gca-{act}-{ln}-{t}-{preset}.json"]) for act, ln in GCA_OPTIONS),
        ):
            resume = ["--resume"] if name not in ("merge-sources",) else []
            add("variants", f"{name}-{t}", ["variants", args[0], "--target", t, *args[1:], *resume],
                [r / d for d in done], ["zero-shot", f"xcross-{t}"])
            names.append(f"{name}-{t}")
        add("variants", f"variants-cost-{t}", ["variants", "cost", "--target", t], [r / f"{v}cost-{t}-{preset}.json"],
            names)
    if "report" in stages:
        # always re-run last (no done file): the report reflects whatever finished
        jobs.append(Job("report", ["report", "--preset", preset], [], after_all=True))
    return jobs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running a job
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def run(jobs: list[Job], workers: int, threads: int, logs: Path, cwd: Path, echo=print, poll_s: float = 5.0,
        locks: Path | None = None, command: list[str] | None = None) -> dict[str, str]:
    """Run the graph with `workers` processes; returns {job: done|failed|skipped|blocked}.

    A job whose lock file names a live process (another `all`, or a run started by hand with `--lock`) is left
    alone and waited for. Jobs whose dependencies failed are `blocked`. `command` is the program each job's args
    are appended to (default: this Python's `-m training`).
    """
    from tqdm import tqdm

    logs.mkdir(parents=True, exist_ok=True)
    locks = locks or logs / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    status = {j.name: "skipped" for j in jobs if j.done and j.finished()}
    running: dict[str, subprocess.Popen] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    command = command or [sys.executable, "-m", "training"]
    bar = tqdm(total=len(jobs), initial=len(status), desc="pipeline", unit="job")

    def locked_elsewhere(name: str) -> bool:
        lock = locks / f"{name}.lock"
        if not lock.exists():
            return False
        try:
            pid = int(lock.read_text().split()[0])
        except (ValueError, IndexError):
            return False
        return pid != os.getpid() and _alive(pid)

    def ready(j: Job) -> bool:
        if j.after_all:
            return all(o.name in status for o in jobs if o is not j)
        return all(status.get(n) in ("done", "skipped") or n not in by_name for n in j.needs)

    while True:
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            (locks / f"{name}.lock").unlink(missing_ok=True)
            ok = rc == 0 and by_name[name].finished()
            status[name] = "done" if ok else "failed"
            bar.update(1)
            echo(f"{time.strftime('%H:%M:%S')} {name}: {status[name]} (exit {rc}; log {logs / f'{name}.log'})")
        for j in jobs:
            if j.name not in status and j.name not in running and any(
                    status.get(n) in ("failed", "blocked") for n in j.needs):
                status[j.name] = "blocked"
                bar.update(1)
        for j in jobs:  # finished meanwhile by a process this runner did not start
            if j.name not in status and j.name not in running and j.done and j.finished():
                status[j.name] = "skipped"
                bar.update(1)
        pending = [j for j in jobs if j.name not in status and j.name not in running]
        if not pending and not running:
            break
        waiting = False
        for j in pending:
            if len(running) >= workers or not ready(j):
                continue
            if locked_elsewhere(j.name):
                waiting = True
                continue
            log = open(logs / f"{j.name}.log", "a")  # noqa: SIM115 - handed to the child process
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join([*command, *j.args])}\n")
            log.flush()
            running[j.name] = subprocess.Popen([*command, *j.args], cwd=cwd, env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
            (locks / f"{j.name}.lock").write_text(f"{running[j.name].pid}\n")
            echo(f"{time.strftime('%H:%M:%S')} {j.name}: started ({' '.join(j.args)})")
        if not running and not waiting:  # nothing runs and nothing can start
            for j in pending:
                status.setdefault(j.name, "blocked")
                bar.update(1)
            break
        time.sleep(poll_s)
    bar.close()
    return status
