"""scripts/gpu_carry.sh: `slim` takes what a staged GPU retrain does not need out of the index (so the device copy of
the tree fits the transfer limit) and keeps what it resumes; `restore` gives back the index exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _repo(tmp_path: Path) -> Path:
    r = tmp_path / "r"
    (r / "scripts").mkdir(parents=True)
    (r / "scripts" / "gpu_carry.sh").write_bytes((REPO / "scripts" / "gpu_carry.sh").read_bytes())
    files = {
        "model/x.py": "code", "results/old.json": "{}", "results/st/floor.json": "{}", "artifacts/lora/T/t.bin": "w",
        "runs/old-run/state.json": json.dumps({"finished": False}),
        "runs/st/artifacts/lora/T/t.bin": "w", "runs/st/done/state.json": json.dumps({"finished": True}),
        "runs/st/done/state.safetensors": "s", "runs/st/going/state.json": json.dumps({"finished": False}),
        "runs/st/going/state.safetensors": "s",
    }
    for path, text in files.items():
        (r / path).parent.mkdir(parents=True, exist_ok=True)
        (r / path).write_text(text)
    (r / ".gitignore").write_text("runs/\n")
    _git(r, "init", "-q")
    _git(r, "add", "-f", ".")
    _git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    return r


def test_slim_keeps_what_the_staged_run_resumes_and_restore_undoes_it(tmp_path):
    r = _repo(tmp_path)
    before = _git(r, "ls-files")
    out = subprocess.run(["bash", "scripts/gpu_carry.sh", "slim", "st"], cwd=r, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kept = set(_git(r, "ls-files").split())
    assert kept == {".gitignore", "model/x.py", "scripts/gpu_carry.sh", "results/st/floor.json",
                    "runs/st/artifacts/lora/T/t.bin", "runs/st/going/state.json", "runs/st/going/state.safetensors"}
    untracked = _git(r, "ls-files", "--others", "--exclude-standard").split()
    assert untracked == []  # the dropped files are excluded, so the device copy leaves them out
    assert (r / "results/old.json").exists()  # nothing deleted from disk
    again = subprocess.run(["bash", "scripts/gpu_carry.sh", "slim", "st"], cwd=r, capture_output=True, text=True)
    assert again.returncode == 1 and "restore first" in again.stderr
    done = subprocess.run(["bash", "scripts/gpu_carry.sh", "restore"], cwd=r, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _git(r, "ls-files") == before and _git(r, "status", "--porcelain") == ""
    assert "gpu_carry" not in (r / ".git/info/exclude").read_text()
