"""The staged GPU session (bench/gpu_session.py) on CPU: what each stage selects, the time
limits, the gate, partial results of a cut-off stage, and the files that come back.

No GPU and no timing: the real collection of ``bench/`` is split into stages, a stage
that runs past its limit still leaves its JSON, and the returned files unpack into one
pytest-benchmark JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from bench import gpu_session as gs
from bench import providers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> list[dict]:
    """bench/ collected through the session's plugin, as stage 0 does it."""
    path = tmp_path_factory.mktemp("collect") / "items.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    cmd += ["-p", "bench.gpu_session", f"--gpu-session-collect={path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(path.read_text())


def test_stages_split_the_whole_suite(collected):
    assigned, dropped = gs.assign(collected)
    ids = [it["nodeid"] for it in collected]
    placed = [i for key in gs.STAGE_KEYS for i in assigned[key]]
    assert sorted(placed + dropped) == sorted(ids), "every benchmark runs in exactly one stage or is a named duplicate"
    assert not assigned["1"], "stage 1 holds the tests, no benchmark"
    # The dropped ones are the rank sweep's r = 2 point, which stage 2 measures.
    assert sorted(dropped) == sorted(
        f"bench/test_layer.py::test_layer_rank_sweep[r2-{p}]" for p in providers.LAYER_PROVIDERS
    )


def test_stage_2_is_the_headline_layer_groups_with_every_provider(collected):
    assigned, _ = gs.assign(collected)
    expected = [
        f"bench/test_layer.py::test_layer[{shape}-bf16-fwd+bwd-{p}]"
        for shape in gs.HEADLINE_SHAPES
        for p in providers.LAYER_PROVIDERS
    ] + [
        f"bench/test_layer.py::test_layer_no_dropout[{shape}-{p}]"
        for shape in gs.HEADLINE_SHAPES
        for p in providers.LAYER_PROVIDERS
    ] + [
        f"bench/test_layer.py::test_layer_graph[{shape}-p{p}-{provider}]"
        for shape in gs.HEADLINE_SHAPES
        for p in (0.25, 0.0)
        for provider in (*providers.LAYER_PROVIDERS, "fused+split")
        if provider != "plain+compile"
    ] + [f"bench/test_layer.py::test_layer_profile[{p}]" for p in ("fused", "fused+split", "plain", "frozen")]
    assert sorted(assigned["2"]) == sorted(expected)


def test_stage_3_is_three_datasets_headline_providers(collected):
    assigned, _ = gs.assign(collected)
    expected = [
        f"bench/test_step.py::test_step[{d}-{p}]"
        for d in ("EuroSAT", "DTD", "ImageNet")
        for p in ("fused", "plain", "frozen", "official", "fused+bucket+half")
    ]
    assert sorted(assigned["3"]) == sorted(expected)
    assert assigned["3o"] and all("test_step_options" in i for i in assigned["3o"])


def test_stage_3t_is_the_interleaved_step_table_on_every_dataset(collected):
    from bench.workloads import DATASETS

    assigned, _ = gs.assign(collected)
    assert assigned["3t"] == [f"bench/test_step.py::test_step_table[{d}]" for d in DATASETS]
    later = [i for key in gs.STAGE_KEYS if key not in ("3t",) for i in assigned[key]]
    assert not any("test_step_table" in i for i in later), "the table runs in stage 3t only"
    assert [s.key for s in gs.parse_stages("3")] == ["3", "3o", "3t"]
    stage = next(s for s in gs.STAGES if s.key == "3t")
    assert stage.bundle == "stage3-step" and not stage.warm and not stage.gate


def test_compiled_steps_come_after_the_eager_step_table(collected):
    assigned, _ = gs.assign(collected)
    assert assigned["4b"] and not any("+compile" in i for i in assigned["4b"])
    # fused / plain / frozen of every other dataset first: the step target's ratios.
    core = [i.rsplit("-", 1)[-1].rstrip("]") in ("fused", "plain", "frozen") for i in assigned["4b"]]
    assert core == sorted(core, reverse=True) and core[0] and not core[-1]
    compiled = assigned["4f"]
    assert compiled and all("test_step[" in i and "+compile" in i for i in compiled)
    assert not any("test_step[" in i and "+compile" in i for i in assigned["4e"])
    # Every dataset once, the fewest classes first, ImageNet last.
    from bench.workloads import DATASETS

    order = [next(d for d in DATASETS if f"-{d}-" in i or f"[{d}-" in i) for i in compiled]
    assert sorted(order) == sorted(DATASETS) and order[-1] == "ImageNet"
    assert [DATASETS[d] for d in order[:-1]] == sorted(DATASETS[d] for d in order[:-1])


def test_headline_stages_fit_their_limits_and_the_budget(collected):
    """The plan's own estimates for an 8-worker GPU machine: stages 1-3 (with 2h, the
    host path, 3o, the step options, and 3t, the step table) each inside its limit;
    1-3o inside the default 540 s budget together, and so is the step table's own call
    (``--stages 3t``, which runs the gate, stage 1, first)."""
    assigned, _ = gs.assign(collected)
    by_id = {it["nodeid"]: it for it in collected}
    tests = [{"nodeid": f"tests/t.py::t{i}", "function": "t", "params": {}} for i in range(190)]
    est = {}
    for stage in gs.parse_stages("1,2,3"):
        items = tests if stage.key == "1" else [by_id[i] for i in assigned[stage.key]]
        est[stage.key] = gs.estimate_s(stage, items, workers=gs.GPU_WORKERS)
        assert est[stage.key] <= stage.cap_s, (
            f"stage {stage.key}: ~{est[stage.key]:.0f} s expected, limit {stage.cap_s} s"
        )
    assert [s.cap_s for s in gs.parse_stages("1,2,3")] == [180, 180, 60, 180, 200, 240]
    assert sum(est[k] for k in ("1", "2", "2h", "3", "3o")) <= 540
    assert est["1"] + est["3t"] <= 540
    # The table's 66 model builds and 31 rounds of six steps on 11 datasets: ~220 s.
    assert 150 <= est["3t"] <= 240


def test_parse_stages():
    assert [s.key for s in gs.parse_stages("3,1,4")] == ["1", "3", "3o", "3t", "4a", "4b", "4c", "4d", "4f", "4e"]
    assert [s.key for s in gs.parse_stages("3t")] == ["3t"]
    assert [s.key for s in gs.parse_stages("2")] == ["2", "2h"]
    assert [s.key for s in gs.parse_stages("4c, 4b")] == ["4b", "4c"]
    with pytest.raises(ValueError, match="unknown stage '5'"):
        gs.parse_stages("1,5")


def test_returned_files_fit_the_device_limits():
    """At most 8 files come back, named in letters, digits, '.', '_' and '-'."""
    names = {f"{s.bundle}.tar.gz" for s in gs.STAGES} | {"stage0-setup.tar.gz", "session.json", "session.log"}
    assert len(names) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


def _junit(tmp_path: Path, cases: list[tuple[str, str | None]]) -> Path:
    body = "".join(
        f'<testcase classname="tests.test_kernels" name="{name}">{"" if tag is None else f"<{tag}/>"}</testcase>'
        for name, tag in cases
    )
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def test_gate_needs_the_real_shape_tests_on_a_gpu(tmp_path):
    ok = gs.Run(rc=0, timed_out=False, seconds=50)
    skipped = gs.junit_counts(_junit(tmp_path, [("test_a", None), ("test_cuda_real_shapes[x]", "skipped")]))
    assert skipped["real_shape_not_passed"] == 1 and skipped["passed"] == 1
    assert "real-shape" in gs.gate_verdict(ok, skipped, cuda=True)
    assert gs.gate_verdict(ok, skipped, cuda=False) is None  # a dry run has no GPU

    passed = gs.junit_counts(_junit(tmp_path, [("test_a", None), ("test_cuda_real_shapes[x]", None)]))
    assert gs.gate_verdict(ok, passed, cuda=True) is None

    failed = gs.junit_counts(_junit(tmp_path, [("test_a", "failure"), ("test_cuda_real_shapes[x]", None)]))
    assert "1 failed" in gs.gate_verdict(gs.Run(rc=1, timed_out=False, seconds=50), failed, cuda=True)
    # Cut off at the limit: on only when the real-shape tests (run first) all passed.
    cut = gs.Run(rc=2, timed_out=True, seconds=120)
    assert gs.gate_verdict(cut, passed, cuda=True) is None
    assert "real-shape" in gs.gate_verdict(cut, gs.junit_counts(_junit(tmp_path, [("test_a", None)])), cuda=True)
    assert "time limit" in gs.gate_verdict(cut, gs.junit_counts(_junit(tmp_path, [])), cuda=True)


def test_a_stage_cut_off_at_its_limit_keeps_what_it_measured(tmp_path):
    """SIGINT at the limit: the benchmarks that finished are saved, the cut-off one is not.

    (Without the session plugin pytest-benchmark fails on the empty cut-off benchmark and
    saves nothing.)  Three short benchmarks, then one that outlives the limit; the limit
    leaves room for a slow pytest start on a busy machine."""
    (tmp_path / "test_slow.py").write_text(
        textwrap.dedent(
            """
            import time, pytest

            @pytest.mark.parametrize("seconds", [0.2, 0.2, 0.2, 600])
            def test_sleep(benchmark, seconds):
                benchmark.pedantic(time.sleep, args=(seconds,), rounds=1, iterations=1)
            """
        )
    )
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_slow.py")]
    cmd += ["--benchmark-only", f"--benchmark-json={out}", "-p", "bench.gpu_session", "--rootdir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    run = gs.run_limited(cmd, log=tmp_path / "log", timeout=30.0, env=env, grace=20, echo=False)
    assert run.timed_out and run.seconds < 60
    assert gs.benchmark_count(out) == 3, (tmp_path / "log").read_text()[-2000:]


def _bench_json(path: Path, rows: list[tuple[str, str, float, float | None]]) -> Path:
    benchmarks = [
        {
            "group": group,
            "fullname": f"bench/test_x.py::test[{group}-{provider}]",
            "extra_info": {"provider": provider, "time_ms": t, "peak_mem_mb": mem},
            "stats": {"median": t / 1e3},
        }
        for group, provider, t, mem in rows
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine_info": {"node": "gpu"}, "datetime": "2026-11-26", "benchmarks": benchmarks}))
    return path


def test_returned_files_unpack_into_one_json_with_the_headline(tmp_path):
    work, files = tmp_path / "work", tmp_path / "files"
    files.mkdir()
    g = "layer vitb16-vision-qkv bf16 r2 p0.25 fwd+bwd"
    _bench_json(work / "stage2-layer" / "stage2.json", [(g, "fused", 1.2, None), (g, "frozen", 1.0, None)])
    _bench_json(
        work / "stage3-step" / "stage3.json",
        [("step ImageNet", "fused", 100.0, 6000.0), ("step ImageNet", "plain", 150.0, 10000.0)],
    )
    gs.bundle(files, "stage2-layer", [work / "stage2-layer"])
    gs.bundle(files, "stage3-step", [work / "stage3-step"])
    context = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-26T02:00:00+00:00", "source_fingerprint": "x"}
    (files / "session.json").write_text(json.dumps({"context": context, "results_name": gs.results_name(context)}))
    assert gs.results_name(context) == "NVIDIA-H100-80GB-HBM3-20261126"
    with tarfile.open(files / "stage2-layer.tar.gz") as tar:
        assert tar.getnames()[0] == "stage2-layer"

    dest = gs.unpack(files, tmp_path / "results", report=False)
    merged = json.loads((dest / "NVIDIA-H100-80GB-HBM3-20261126.json").read_text())
    assert len(merged["benchmarks"]) == 4
    assert merged["clip_lora_session"]["context"]["device"] == "NVIDIA H100 80GB HBM3"
    assert merged["clip_lora_session"]["matches_tree_at_unpack"] is False  # fingerprint "x" is no tree's

    groups = gs.load_groups([dest / "stage2-layer" / "stage2.json", dest / "stage3-step" / "stage3.json"])
    rows = {(r["group"], r["ratio"]): r["value"] for r in gs.headline(groups)}
    assert rows[(g, "fused ÷ frozen")] == pytest.approx(1.2)
    assert rows[("step ImageNet", "step plain ÷ fused")] == pytest.approx(1.5)
    assert rows[("step ImageNet", "peak memory fused ÷ plain")] == pytest.approx(0.6)
    assert rows[(g, "plain ÷ fused")] is None  # not measured is not a number


def test_headline_takes_the_interleaved_step_table(tmp_path):
    """A stage-3t JSON's per-dataset plain ÷ fused (minimum wall) reaches the headline."""
    ratios = {"plain ÷ fused": {"num": "plain", "den": "fused", "wall_ratio": 1.4, "cpu_ratio": 1.3}}
    bench = {
        "group": "step table Food101",
        "fullname": "bench/test_step.py::test_step_table[Food101]",
        "extra_info": {"kind": "step-table", "provider": "interleaved", "ratios": ratios},
        "stats": {"median": 4.0},
    }
    path = tmp_path / "stage3t.json"
    path.write_text(json.dumps({"benchmarks": [bench]}))
    rows = {(r["group"], r["ratio"]): r for r in gs.headline(gs.load_groups([path]))}
    row = rows[("step table Food101", "step plain ÷ fused (interleaved)")]
    assert row["value"] == pytest.approx(1.4) and row["target"] == "≥ 1.25"
    assert not any(g.startswith("step table ") for g, _ in rows if g != "step table Food101")


def test_unpack_without_session_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="session.json"):
        gs.unpack(tmp_path, None)


def test_source_fingerprint_follows_the_sources(tmp_path):
    for d in ("lora_kernels", "clip_lora", "bench", "tests"):
        (tmp_path / d).mkdir()
    (tmp_path / "setup.py").write_text("setup()\n")
    (tmp_path / "bench" / "a.py").write_text("x = 1\n")
    first = gs.source_fingerprint(tmp_path)
    (tmp_path / "bench" / "notes.md").write_text("not a source\n")
    assert gs.source_fingerprint(tmp_path) == first
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    assert gs.source_fingerprint(tmp_path) != first


def test_launch_script_is_valid_bash_and_states_the_launch():
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_session.sh")]).returncode == 0
    for needed in ('carry=[".whl"]', "timeout_s=600", "bench.gpu_session unpack", "--dry-run"):
        assert needed in script, needed
