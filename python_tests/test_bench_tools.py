"""The bench tools that decide what a results table says, checked on the CPU.

bench/gpu_targets.py must read a GPU run's CSVs right (a wrong "met" would close the GPU
issue on a false figure); bench/harness.tf32 must reach the kernels' precision rule, or the
"tf32" rows would time full-fp32 kernels under a TF32 label; and a run of some models in
bench/compare_synthetic.py must keep the other models' rows and curves, not lose them, and
the same seed must give it the same rows; bench/triton_sm90_resources.py --check (run by CI)
must fail on every kind of regression against the committed report.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from conftest import BENCH, bench_module

AUTO = 'backend="auto", order rule (CUDA, else Triton) picks the fastest'  # the target lines of backend="auto"
MEASURED = 'backend="auto", measure rule (default) as fast as the faster kernel'

@pytest.fixture(scope="module")
def targets():
    return bench_module("gpu_targets")


@pytest.fixture(scope="module")
def harness():
    return bench_module("harness")


def _write(folder: str, op: str, rows: list) -> None:
    with open(os.path.join(folder, f"{op}_test_gpu.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def _row(harness, op, case, backend, dtype, shape, ms, speedup=float("nan"), memory=float("nan")):
    return harness.Row(op, case, backend, "test gpu", dtype, shape, ms, 1.0, speedup_vs_reference=speedup,
                       memory_vs_reference=memory, commit="x")


def _lines(targets, folder: str) -> dict[str, str]:
    lines = targets.report(targets.load(folder, "test_gpu"))
    return {target: line for (target, _), line in zip(targets.TARGETS, lines)}


def test_report_reads_the_committed_h100_run(targets):
    rows = targets.load(os.path.join(BENCH, "results"), "nvidia_h100_80gb_hbm3")
    lines = dict(zip((t for t, _ in targets.TARGETS), targets.report(rows)))
    assert "3.969 s (cuda, bfloat16" in lines["cross_attention eval 1000 x 5000, bf16 < 0.3 s"]
    assert lines["cross_attention eval 1000 x 5000, bf16 < 0.3 s"].endswith("NOT MET")
    assert "0.51x, memory 0.030x (triton" in lines["hardest_negative embeddings N = 16384 >= 1x, <= 1/30 memory"]
    assert lines["SGRAF SGR 1000 x 5000, bf16 < 1 s"].split()[-3:] == ["not", "measured", "-"]
    auto = lines[AUTO]
    assert "CUDA slower than Triton in 0 of 19 calls; the reference faster in 2" in auto and auto.endswith("NOT MET")
    assert lines[MEASURED].split()[-3:] == ["not", "measured", "-"]  # that run had no "auto" rows


def test_auto_is_judged_on_every_call_that_timed_both_kernels(targets, harness, tmp_path):
    op = "pairwise_similarity"
    fast = [_row(harness, op, "train fwd+bwd float32", "cuda", "float32", "s", 1.0),
            _row(harness, op, "train fwd+bwd float32", "triton", "float32", "s", 1.04),
            _row(harness, op, "train fwd+bwd float32", "reference", "float32", "s", 2.0),
            _row(harness, op, "eval fwd", "triton", "bfloat16", "s", 0.1)]  # no CUDA row: not judged
    _write(tmp_path, op, fast)
    assert _lines(targets, tmp_path)[AUTO].endswith(" met")
    _write(tmp_path, op, fast + [_row(harness, op, "eval fwd", "cuda", "bfloat16", "s", 0.3)])
    line = _lines(targets, tmp_path)[AUTO]
    assert "CUDA slower than Triton in 1 of 2 calls" in line and "3.00x: pairwise_similarity, eval fwd" in line
    assert line.endswith("NOT MET")
    _write(tmp_path, op, fast[:2] + [_row(harness, op, "train fwd+bwd float32", "reference", "float32", "s", 0.9)])
    assert _lines(targets, tmp_path)[AUTO].endswith("NOT MET")  # the reference was faster


def test_measured_auto_is_judged_against_the_faster_kernel_of_each_call(targets, harness, tmp_path):
    op = "max_sim"
    rows = [_row(harness, op, "forward", "cuda", "float32", "s", 1.0),
            _row(harness, op, "forward", "triton", "float32", "s", 0.5),
            _row(harness, op, "forward", "auto", "float32", "s", 0.52),
            _row(harness, op, "forward", "reference", "float32", "s", 0.4),  # counted, not held against it
            _row(harness, op, "fwd+bwd", "cuda", "float32", "s", 1.0),
            _row(harness, op, "fwd+bwd", "triton", "float32", "s", 2.0),
            _row(harness, op, "fwd+bwd", "auto", "float32", "s", 1.01),
            _row(harness, op, "bf16 forward", "auto", "bfloat16", "s", 9.0)]  # no kernel rows: not judged
    _write(tmp_path, op, rows)
    line = _lines(targets, tmp_path)[MEASURED]
    assert "by over 5% in 0 of 2 calls; the reference faster than both in 1" in line and line.endswith(" met")
    _write(tmp_path, op, rows + [_row(harness, op, "forward", "auto", "float32", "s", 0.6)])  # replaces 0.52
    line = _lines(targets, tmp_path)[MEASURED]
    assert "in 1 of 2 calls (worst 1.20x: max_sim, forward, float32, s)" in line and line.endswith("NOT MET")


def test_met_needs_every_condition_of_the_target(targets, harness, tmp_path):
    ca, hn = "cross_attention", "hardest_negative_loss"
    _write(tmp_path, "sgraf", [
        _row(harness, "sgraf", "eval SGR similarity", "loop", "float32", "1000img x 5000cap", 40_000.0),
        _row(harness, "sgraf", "eval SGR similarity", "cuda", "float32", "1000img x 5000cap", 2_500.0),
        _row(harness, "sgraf", "eval SGR similarity", "cuda", "tf32", "1000img x 5000cap", 1_500.0),
        _row(harness, "sgraf", "eval SGR similarity", "cuda", "bfloat16", "1000img x 5000cap", 1_200.0),
    ])
    _write(tmp_path, ca, [
        # fast enough but over the memory bound, and within it but too slow: not met
        _row(harness, ca, "train fwd+bwd fp32", "cuda", "float32", "s", 1.0, speedup=5.0, memory=0.2),
        _row(harness, ca, "train fwd+bwd fp32", "triton", "tf32", "s", 1.0, speedup=3.0, memory=0.1),
        _row(harness, ca, "eval fwd", "triton", "bfloat16", "1000img x 5000cap", 290.0),
    ])
    _write(tmp_path, hn, [
        _row(harness, hn, "embeddings fwd+bwd", "triton", "float32", "N=4096,d=1024", 1.0, speedup=2.0, memory=0.01),
        _row(harness, hn, "embeddings fwd+bwd", "triton", "float32", "N=16384,d=1024", 1.0, speedup=1.1, memory=0.02),
        _row(harness, hn, "max_violation fwd+bwd", "triton", "float32", "N=128", 1.0, speedup=0.9),
    ])
    lines = _lines(targets, tmp_path)
    assert lines["SGRAF SGR 1000 x 5000, fp32 / TF32 < 2 s"].split()[-1] == "met"  # the TF32 row counts
    assert "1.500 s (cuda, tf32" in lines["SGRAF SGR 1000 x 5000, fp32 / TF32 < 2 s"]
    assert lines["SGRAF SGR 1000 x 5000, bf16 < 1 s"].endswith("NOT MET")
    assert "40.00 s" in lines["SGRAF SGR 1000 x 5000, the published loop"]
    assert lines["cross_attention eval 1000 x 5000, bf16 < 0.3 s"].split()[-1] == "met"
    assert lines["cross_attention train 128 x 128 >= 4x, <= 1/8 memory"].endswith("NOT MET")
    assert lines["hardest_negative embeddings N = 16384 >= 1x, <= 1/30 memory"].split()[-1] == "met"
    assert "slowest 0.90x (hardest_negative_loss, max_violation fwd+bwd" in lines["every Triton backward >= 1x the reference"]
    assert lines["every Triton backward >= 1x the reference"].endswith("NOT MET")
    assert lines["MPSM training step >= 2x"].split()[-3:] == ["not", "measured", "-"]


def test_tf32_rows_reach_the_kernels_precision_rule(harness):
    from sgfused.triton._common import dot_precision

    seen = harness.tf32(lambda: dot_precision(torch.float32))()
    assert seen == "tf32"
    assert dot_precision(torch.float32) == "ieee"  # restored after the call
    with pytest.raises(RuntimeError):
        harness.tf32(lambda: (_ for _ in ()).throw(RuntimeError("boom")))()
    assert dot_precision(torch.float32) == "ieee"  # and after a failing call


def test_gpu_check_script_parses_and_refuses_an_unknown_stage(tmp_path):
    script = os.path.join(BENCH, "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    done = subprocess.run(["bash", script, "nonsense"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 2 and "usage" in done.stderr


def test_a_stopped_bench_still_writes_the_rows_it_measured(tmp_path, harness):
    """bench/gpu_check.sh stops a bench at its time limit with SIGTERM: the rows measured until then are written,
    with their ratios against the reference, and every row records SGFUSED_COMMIT (a device's tree has no git)."""
    import signal

    script = tmp_path / "bench_stopped.py"
    script.write_text(
        "import sys, time, torch\n"
        f"sys.path.insert(0, {BENCH!r})\n"
        "import harness\n"
        f"harness.RESULTS = {str(tmp_path)!r}\n"
        "def run(device, quick):\n"
        "    rows = [harness.measure('op', 'case', name, device, torch.float32, 'n=8', lambda: torch.ones(8) * 2)\n"
        "            for name in ('reference', 'cpu')]\n"
        "    print('measured', flush=True)\n"
        "    time.sleep(120)\n"
        "    return rows\n"
        "harness.main('stopped_op', run, None)\n")
    bench = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                             env={**os.environ, "SGFUSED_COMMIT": "abc1234"})
    for line in bench.stdout:
        if line.strip() == "measured":
            break
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    rows = harness.read(str(tmp_path / "stopped_op_cpu.csv"))
    assert [row.backend for row in rows] == ["reference", "cpu"]
    assert rows[0].speedup_vs_reference == 1.0 and rows[1].speedup_vs_reference > 0
    assert {row.commit for row in rows} == {"abc1234"}


@pytest.fixture(scope="module")
def resources():
    return bench_module("triton_sm90_resources")


def test_the_resource_check_passes_the_committed_report_against_itself(resources):
    committed = resources.read_report()
    assert len(committed) > 50 and {r["op"] for r in committed} >= {"cross_attention", "max_sim"}
    assert resources.regressions(committed, committed) == []


def test_the_resource_check_catches_every_regression(resources):
    committed = resources.read_report()
    spill_free = next(i for i, r in enumerate(committed) if r["stack_bytes"] == 0)
    spilling = next(i for i, r in enumerate(committed) if r["stack_bytes"] > 0)

    def changed(i: int, **fields) -> list[dict]:
        return [dict(r, **fields) if j == i else dict(r) for j, r in enumerate(committed)]

    assert resources.regressions(changed(spilling, stack_bytes=committed[spilling]["stack_bytes"] - 8), committed) == []
    for rows in (changed(spill_free, stack_bytes=8),                                        # a new spill
                 changed(spilling, stack_bytes=committed[spilling]["stack_bytes"] + 8),     # a larger one
                 changed(spill_free, kernel="_unlisted_kernel", stack_bytes=8),            # new, and spilling
                 committed[:-1],                                                            # a kernel gone
                 changed(spill_free, triton="0.0.0")):                                       # another Triton
        assert len(resources.regressions(rows, committed)) >= 1
    dot = next(i for i, r in enumerate(committed) if r["dtype"] == "bfloat16" and r["dots"])
    found = resources.regressions(changed(dot, matrix="fma"), committed)
    assert len(found) == 1 and "tensor-core" in found[0]


SETTINGS = {"setting": "hard", "seed": 0}


def _table_row(model: str, rsum: str, **settings) -> dict:
    return {"model": model, "rsum": rsum} | {k: str(v) for k, v in (SETTINGS | settings).items()}


def _write_dicts(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def compare():
    return bench_module("compare_synthetic")


def test_a_subset_run_keeps_the_other_models_rows(compare, tmp_path):
    path = tmp_path / "table.csv"
    _write_dicts(path, [
        _table_row("VSE++", "250"),
        _table_row("SGRAF (SGR)", "400"), _table_row("SGRAF (SAF)", "370"),
        _table_row("MPSM (dis)", "230"), _table_row("MPSM (dis), spatial prior off", "220"),
        _table_row("SGM", "580", seed=1),  # other settings: dropped
        _table_row("SGRAF (SGR+SAF average)", "430"), _table_row("MPSM* (dis+dir average)", "300"),
    ])
    fresh = [{"model": "MPSM (dis)", "rsum": "260"}, {"model": "MPSM (dis), spatial prior off", "rsum": "240"},
             {"model": "SGRAF (SGR)", "rsum": "410"}]
    table = compare.merged_table(fresh, str(path), SETTINGS, {"mpsm_dis", "sgr"})
    assert [(r["model"], r["rsum"]) for r in table] == [
        ("VSE++", "250"), ("SGRAF (SGR)", "410"), ("SGRAF (SAF)", "370"),
        ("MPSM (dis)", "260"), ("MPSM (dis), spatial prior off", "240"),
    ]  # both ensembles had a member rerun: their old rows go (the run recomputes them when it can)
    assert all(r["seed"] == "0" for r in table)
    assert compare.merged_table(fresh, str(tmp_path / "absent.csv"), SETTINGS, {"mpsm_dis", "sgr"}) == [
        r | {k: str(v) for k, v in SETTINGS.items()} for r in fresh[2:] + fresh[:2]]


def test_a_subset_run_keeps_the_other_models_curves(compare, tmp_path):
    path = tmp_path / "curves.csv"
    _write_dicts(path, [{"model": m, "step": str(s), "dev_rsum": str(v)} | {k: str(x) for k, x in SETTINGS.items()}
                        for m, s, v in (("vsepp", 10, 100.0), ("vsepp", 20, 150.0), ("sgm", 10, 300.0))])
    histories = compare.merged_curves({"sgm": [(5, 1.0)]}, str(path), SETTINGS)
    assert histories == {"vsepp": [(10, 100.0), (20, 150.0)], "sgm": [(5, 1.0)]}
    compare.write_curves(histories, str(path), SETTINGS)
    assert compare.merged_curves({}, str(path), SETTINGS) == histories  # written, read back
    assert compare.merged_curves({}, str(path), SETTINGS | {"seed": 2}) == {}


def test_a_variant_is_trained_only_when_named_and_gets_its_models_ablations(compare):
    """The default run trains the papers' models; ``mpsm_*_printed`` is MPSM with Eq. 5 as printed (logits x 1)."""
    assert set(compare.VARIANTS) <= set(compare.MODELS) and not set(compare.VARIANTS) & set(compare.DEFAULT_MODELS)
    assert set(compare.DEFAULT_MODELS) | set(compare.VARIANTS) == set(compare.MODELS)
    for tag, perspective in (("dis", "distance"), ("dir", "direction")):
        _, registry, options, training = compare.MODELS[f"mpsm_{tag}_printed"]
        assert (registry, options, training) == ("mpsm", {"perspective": perspective, "kgid_logit_scale": 1.0}, {})
        assert [a[0] for a in compare.ABLATIONS[f"mpsm_{tag}_printed"]] == [a[0] for a in compare.ABLATIONS[f"mpsm_{tag}"]]


def test_a_variants_rows_belong_to_the_variant_not_to_the_model_its_name_starts_with(compare):
    """"MPSM (dir), Eq. 5 as printed, spatial prior off" starts with "MPSM (dir), " too: the longest name owns it,
    so rerunning MPSM (dir) alone keeps the variant's rows, and rerunning the variant replaces them."""
    assert compare.owner("MPSM (dir)") == "mpsm_dir"
    assert compare.owner("MPSM (dir), spatial prior off") == "mpsm_dir"
    assert compare.owner("MPSM (dir), Eq. 5 as printed") == "mpsm_dir_printed"
    assert compare.owner("MPSM (dir), Eq. 5 as printed, spatial prior off") == "mpsm_dir_printed"
    assert compare.owner("MPSM* (dis+dir average)") is None


def _quick_comparison(data) -> tuple[list[dict], list[dict]]:
    """The table (less the training time) and the curves of a --quick VSE++ and SGM comparison in ``data``."""
    script = os.path.join(BENCH, "compare_synthetic.py")
    subprocess.run([sys.executable, script, "--quick", "--data", str(data), "--models", "vsepp,sgm", "--threads", "1"],
                   check=True, capture_output=True)
    results = f"{data}_quick/results"
    with open(os.path.join(results, "synthetic_comparison.csv"), newline="") as handle:
        table = [{k: v for k, v in r.items() if k != "train_min"} for r in csv.DictReader(handle)]
    with open(os.path.join(results, "synthetic_curves.csv"), newline="") as handle:
        return table, list(csv.DictReader(handle))


def test_the_same_seed_gives_the_same_row(tmp_path):
    """compare_synthetic's promise for a stop that is not "budget": the data generated afresh from the same seed
    and the models trained on it again give the same rows (ablations included) and the same curves."""
    first, second = _quick_comparison(tmp_path / "a"), _quick_comparison(tmp_path / "b")
    table, curves = first
    assert [r["model"] for r in table] == ["VSE++", "SGM", "SGM, no graph relations"]
    assert all(r["stopped"] in ("plateau", "max epochs") for r in table[:2]) and len(curves) >= 3  # <= 2 epochs each
    assert second == first
    for key in ("vsepp", "sgm"):  # and bit for bit the same weights, which rounded recalls alone could hide
        a, b = (torch.load(f"{tmp_path / run}_quick/runs/{key}/best.pt", weights_only=True)["model"] for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), key
