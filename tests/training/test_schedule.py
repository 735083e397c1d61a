"""`python -m training all`: the job graph and its runner (dependencies, failures, skip-if-done, locks)."""

from __future__ import annotations

import subprocess
import sys
import time

from training.data import DOMAINS
from training.schedule import STAGES, Job, plan, run

# a stand-in for `python -m training`: `touch PATH` creates PATH, `fail` exits 1, `sleep S` waits
FAKE = [sys.executable, "-c", (
    "import sys, time, pathlib\n"
    "op, *rest = sys.argv[1:]\n"
    "if op == 'fail': sys.exit(1)\n"
    "if op == 'sleep': time.sleep(float(rest[0]))\n"
    "if op == 'touch':\n"
    "    pathlib.Path(rest[0]).parent.mkdir(parents=True, exist_ok=True)\n"
    "    pathlib.Path(rest[0]).write_text(str(time.time()))\n"
)]


def _run(jobs, tmp_path, workers=2, **kw):
    return run(jobs, workers, 1, tmp_path / "logs", tmp_path, echo=lambda *_: None, poll_s=0.05, command=FAKE, **kw)


def test_plan_covers_the_pipeline_in_priority_order(tmp_path):
    jobs = plan("cpu", tmp_path)
    names = [j.name for j in jobs]
    assert names[-1] == "report" and jobs[-1].after_all
    for d in DOMAINS:
        assert f"lora-{d}" in names and f"xcross-{d}" in names
        assert names.index(f"lora-{d}") < names.index("zero-shot") < names.index(f"xcross-{d}")
    # every X-Cross comes before any ablation, which come before the low-data curves
    last_xcross = max(names.index(f"xcross-{d}") for d in DOMAINS)
    assert last_xcross < min(i for i, n in enumerate(names) if n.startswith("minus-"))
    assert max(i for i, n in enumerate(names) if n.startswith("minus-")) < names.index("low-data-Tools")
    zs = next(j for j in jobs if j.name == "zero-shot")
    assert zs.needs == [f"zero-shot-{d}" for d in DOMAINS]
    assert next(j for j in jobs if j.name == "zero-shot-Toys").needs == ["lora-Toys"]  # a row needs its LoRA only
    # a target's X-Cross, baselines and ablations need the other domains' rows, not its own LoRA's
    for name in ("xcross-Electronics", "mean-Electronics", "minus-layers-Electronics"):
        assert next(j for j in jobs if j.name == name).needs == ["zero-shot-Tools", "zero-shot-Toys",
                                                                  "zero-shot-Sports"]
    experts = next(j for j in jobs if j.name == "minus-experts-Tools")
    assert experts.args[experts.args.index("--beta") + 1] == "0"  # the paper's -Experts: beta = 0
    assert all("--preset" in j.args and j.args[j.args.index("--preset") + 1] == "cpu" for j in jobs)
    assert next(j for j in jobs if j.name == "lora-Tools").done == [tmp_path / "lora-Tools-cpu.json"]


def test_plan_with_a_checkpoint_root_needs_the_checkpoint_too(tmp_path):
    """A checkout that kept results/ but lost the ignored artifacts/ must re-export the LoRA, not skip it."""
    results, artifacts = tmp_path / "results", tmp_path / "artifacts"
    jobs = {j.name: j for j in plan("cpu", results, stages=("lora", "xcross"), artifacts=artifacts)}
    results.mkdir()
    (results / "lora-Toys-cpu.json").write_text("{}")
    assert not jobs["lora-Toys"].finished()
    (artifacts / "lora" / "Toys").mkdir(parents=True)
    (artifacts / "lora" / "Toys" / "manifest.json").write_text("{}")
    assert jobs["lora-Toys"].finished()
    assert jobs["xcross-Tools"].done == [results / "xcross-Tools-cpu.json",
                                         artifacts / "xcross" / "Tools" / "manifest.json"]


def test_plan_runs_the_variants_after_their_x_cross(tmp_path):
    jobs = {j.name: j for j in plan("cpu", tmp_path, stages=("variants",), variant_targets=("Toys",))}
    assert set(jobs) == {"weaverec-Toys", "merge-sources-Toys", "joint-Toys", "gca-sigmoid-ln-Toys",
                         "gca-sigmoid-noln-Toys", "gca-tanh-ln-Toys", "gca-tanh-noln-Toys", "variants-cost-Toys"}
    assert jobs["weaverec-Toys"].args[:4] == ["variants", "train-weaverec", "--target", "Toys"]
    assert "--learn-lambda" in jobs["weaverec-Toys"].args and "xcross-Toys" in jobs["weaverec-Toys"].needs
    assert "--no-ln" in jobs["gca-tanh-noln-Toys"].args and "--ln" in jobs["gca-sigmoid-ln-Toys"].args
    assert jobs["gca-tanh-noln-Toys"].done == [tmp_path / "variants-gca-tanh-noln-Toys-cpu.json"]
    assert set(jobs["variants-cost-Toys"].needs) == set(jobs) - {"variants-cost-Toys"}


def test_plan_stages_and_targets_narrow_it(tmp_path):
    jobs = plan("cpu", tmp_path, targets=("Toys",), stages=("xcross", "ablations"), ablation_targets=("Toys",))
    assert [j.name for j in jobs] == ["xcross-Toys", "minus-layers-Toys", "minus-interactions-Toys",
                                      "minus-experts-Toys"]
    assert set(STAGES) >= {"lora", "xcross", "report"}


def test_run_respects_dependencies_and_skips_finished_jobs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    jobs = [Job("a", ["touch", str(a)], [a]), Job("b", ["touch", str(b)], [b], ["a"]),
            Job("c", ["touch", str(c)], [c], ["b"])]
    assert _run(jobs, tmp_path) == {"a": "done", "b": "done", "c": "done"}
    assert float(a.read_text()) <= float(b.read_text()) <= float(c.read_text())  # in dependency order
    first = c.read_text()
    assert _run(jobs, tmp_path) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert c.read_text() == first  # not run again
    assert "touch" in (tmp_path / "logs" / "a.log").read_text()


def test_a_failure_blocks_its_dependents_but_not_the_rest_and_the_report_still_runs(tmp_path):
    ok, after, report = tmp_path / "ok", tmp_path / "after", tmp_path / "report"
    jobs = [Job("bad", ["fail"], [tmp_path / "never"]), Job("child", ["touch", str(after)], [after], ["bad"]),
            Job("ok", ["touch", str(ok)], [ok]), Job("report", ["touch", str(report)], [], after_all=True)]
    status = _run(jobs, tmp_path)
    assert status == {"bad": "failed", "child": "blocked", "ok": "done", "report": "done"}
    assert ok.exists() and report.exists() and not after.exists()


def test_exit_zero_without_the_result_file_is_a_failure(tmp_path):
    assert _run([Job("liar", ["sleep", "0"], [tmp_path / "missing"])], tmp_path) == {"liar": "failed"}


def test_workers_bound_the_parallelism(tmp_path):
    outs = [tmp_path / f"j{i}" for i in range(3)]
    jobs = [Job(f"j{i}", ["touch", str(o)], [o]) for i, o in enumerate(outs)]
    assert set(_run(jobs, tmp_path, workers=1).values()) == {"done"}
    stamps = sorted(float(o.read_text()) for o in outs)
    assert stamps == [float(o.read_text()) for o in outs]  # one at a time, in priority order


def test_a_job_locked_by_a_live_process_is_waited_for_not_started_twice(tmp_path):
    out = tmp_path / "x"
    t0 = time.time()
    holder = subprocess.Popen([*FAKE, "sleep", "0.6"])
    locks = tmp_path / "logs" / "locks"
    locks.mkdir(parents=True)
    (locks / "x.lock").write_text(f"{holder.pid}\n")
    try:
        status = _run([Job("x", ["touch", str(out)], [out])], tmp_path)
    finally:
        holder.wait()
    assert status == {"x": "done"} and out.exists()
    assert float(out.read_text()) >= t0 + 0.6  # started only after the holder exited
