"""The report's training-curve panels: which runs and reference lines each target's panel gets."""

import json

from training.report import curve_series, plot_curves


def _curve(*points):
    return [{"step": s, "users_seen": 8 * s, "hit@1": m / 2, "mrr@10": m} for s, m in points]


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_curves_come_from_results_and_from_the_states_of_runs_still_training(tmp_path):
    results, runs = tmp_path / "results", tmp_path / "runs"
    val = {s: {t: {"hit@1": 5.0, "mrr@10": 10.0 + i, "n_users": 877} for t in ("Tools", "Toys")}
           for i, s in enumerate(("Sports", "Electronics", "Toys", "Tools"))}
    _write(results / "zero_shot.json", {"val": val, "sources": {"Tools": ["Sports", "Electronics"]}})
    _write(results / "lora-Tools-cpu.json", {"curve": _curve((500, 17.0), (1000, 18.0))})
    _write(results / "xcross-Tools-smoke.json", {"curve": _curve((10, 99.0))})  # another preset: not plotted
    _write(runs / "xcross-Tools-cpu" / "state.json", {"step": 1325, "curve": _curve((1000, 17.5))})
    # a finished run's result file wins over the state it left behind
    _write(results / "pooler-scorer-Tools-cpu.json", {"curve": _curve((1000, 16.0), (2000, 16.5))})
    _write(runs / "pooler-scorer-Tools-cpu" / "state.json", {"step": 1500, "curve": _curve((1000, 16.0))})
    _write(runs / "minus-layers-Tools-cpu" / "state.json", {"step": 20, "curve": []})  # no evaluation yet
    # trained to the end, dev evaluation not done yet
    _write(runs / "minus-experts-Tools-cpu" / "state.json", {"step": 2960, "finished": True,
                                                             "curve": _curve((1000, 17.0), (2000, 17.2))})

    panels = curve_series(results, "cpu", runs)
    assert list(panels) == ["Tools"]
    tools = panels["Tools"]
    assert [(r["kind"], r["running"], r["trained"], r["step"]) for r in tools["runs"]] == [
        ("lora", False, False, None), ("xcross", True, False, 1325), ("pooler-scorer", False, False, None),
        ("minus-experts", True, True, 2960)]
    assert [c["mrr@10"] for c in tools["runs"][2]["curve"]] == [16.0, 16.5]
    assert {s: m["mrr@10"] for s, m in tools["sources"].items()} == {"Sports": 10.0, "Electronics": 11.0}

    finished_only = curve_series(results, "cpu")
    assert [r["kind"] for r in finished_only["Tools"]["runs"]] == ["lora", "pooler-scorer"]
    assert plot_curves(results, tmp_path / "c.png", "cpu", runs).stat().st_size > 1000
    assert plot_curves(results, tmp_path / "none.png", "paper") is None and not (tmp_path / "none.png").exists()
