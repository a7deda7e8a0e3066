"""The staged GPU session behind ``bench/gpu_session.sh``: what runs in which stage, under
which time limit, and what comes back.

A GPU run may last 10 minutes and brings back at most 8 files, and pytest-benchmark
writes its JSON only when pytest ends.  So the session runs in stages, in order, each
one a pytest process under its own time limit that writes its own JSON and log, bundled
into ``$OUT`` before the next stage starts; a run cut off anywhere returns every stage
it finished and the part of the current one that was measured (on its time limit a
stage gets SIGINT, as Ctrl-C, and pytest-benchmark saves the benchmarks that ran):

1. the correctness tests on CUDA, at real shapes among them.  If one fails (or the
   real-shape tests did not run), the session stops: nothing is timed;
2. the headline layer ratios: ViT-B/16 q/k/v and out_proj, bf16, p = 0.25 and p = 0,
   every layer provider, eager and (``test_layer_graph``) captured in a CUDA graph, which
   times the kernels without the host, and (``test_layer_profile``) each op's host and
   device time;
   then (2h) the layer's host time per call with the real kernels on tiny shapes,
   against ``F.linear`` (``bench/host_path.py``);
3. the training step on EuroSAT (10 classes), DTD (47) and ImageNet (1000): fused,
   plain, frozen, official, fused+bucket+half, with peak memory; then (3o) the step's
   options on ImageNet, interleaved, and (3t) the step table on all 11 datasets,
   interleaved (``test_step_table``: fused, plain, frozen, official and the two
   bucketed half-stored steps, round-robin, so the per-dataset ratios do not follow the
   host's load);
4. the rest of ``bench/``, in parts (4a ...), as long as the budget lasts; a later call
   runs the parts left (``--stages 4b,4c``).

Stages with ``torch.compile`` or many kernel variants first compile in parallel
(pytest-xdist, benchmarks off, which fills the Triton and Inductor caches on disk), then
time one benchmark at a time.  This is inside the stage's time, so the printed expected
time is the device time.

    python -m bench.gpu_session run [--dry-run] [--stages 1,2,3,4] [--budget 540] [--out DIR]
    python -m bench.gpu_session unpack FILES_DIR [DEST]   # on the CPU machine, after the run

``unpack`` turns the bundles into ``bench/results/<gpu>-<date>/``: the stage folders,
one merged pytest-benchmark JSON (``python -m bench.report`` reads it) and the report.

Selection works on the collected benchmarks (``-p bench.gpu_session --gpu-session-collect
FILE`` writes each item's node id and parameters), so benchmarks added to ``bench/`` land
in the last part without an edit here.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# =============================================================================
# Collection: every benchmark's node id and parameters
# =============================================================================


REAL_SHAPE_TESTS = "test_cuda_real_shapes"


def pytest_addoption(parser) -> None:
    parser.addoption("--gpu-session-collect", metavar="FILE", help="write the collected items as JSON (gpu_session)")
    parser.addoption(
        "--gpu-session-real-shapes-first", action="store_true", help="run the real-shape CUDA tests first (gpu_session)"
    )


def pytest_collection_modifyitems(config, items) -> None:
    # Stage 1's gate needs the real-shape tests; run them first, so a stage cut off at its
    # limit has them.  Stable sort: the rest keeps its order.
    if config.getoption("--gpu-session-real-shapes-first", False):
        items.sort(key=lambda item: not item.name.startswith(REAL_SHAPE_TESTS))


def _param_value(value: object) -> object:
    # LayerShape and StepWorkload are named by their workload; everything else by itself.
    for attr in ("name", "dataset"):
        if isinstance(getattr(value, attr, None), str):
            return getattr(value, attr)
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def pytest_collection_finish(session) -> None:
    path = session.config.getoption("--gpu-session-collect", None)
    if not path:
        return
    items = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        params = {k: _param_value(v) for k, v in callspec.params.items()} if callspec else {}
        items.append({"nodeid": item.nodeid, "function": getattr(item, "originalname", item.name), "params": params})
    _write_json(Path(path), items)


# A stage cut off at its limit gets SIGINT; pytest then ends its session and
# pytest-benchmark saves its JSON, but the benchmark that was running has no rounds and
# saving it fails (``min()`` of no data), which would lose the whole stage.  Under this
# plugin only the benchmarks whose test passed are saved.
_PASSED: set[str] = set()


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" and report.passed:
        _PASSED.add(report.nodeid)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    bench = getattr(session.config, "_benchmarksession", None)
    if bench is not None:
        bench.benchmarks[:] = [b for b in bench.benchmarks if b.fullname in _PASSED]
    yield


# =============================================================================
# Stages
# =============================================================================

HEADLINE_SHAPES = ("vitb16-vision-qkv", "vitb16-vision-out")
HEADLINE_DATASETS = ("EuroSAT", "DTD", "ImageNet")
# fused / plain / frozen give the headline step ratios; official (the paper code's step)
# is what users compare with first, and fused+bucket+half is the eager step with the
# training options on (issue 13's table).
HEADLINE_STEP_PROVIDERS = ("fused", "plain", "frozen", "official", "fused+bucket+half")
LAYER_FUNCTIONS = ("test_layer", "test_layer_no_dropout")
STEP_FUNCTIONS = ("test_step", "test_step_options", "test_step_table")
TEST_FILES = (
    "tests/test_kernels.py",
    "tests/test_dropout.py",
    "tests/test_api.py",
    "tests/test_kernel_edge_cases.py",
    "tests/test_kernel_properties.py",
    "tests/test_split_backward.py",
    "tests/test_flat_adapters.py",
    # The layer under CUDA-graph capture (what --compile's CUDA graphs replay).
    "tests/test_host_path.py::test_fused_layer_replays_in_a_cuda_graph",
    "tests/test_host_path.py::test_drawn_seed_advances_with_every_replay",
)

# Expected device time before any GPU run measured it (H100; revise from session.json):
# a process start (torch, open_clip, CUDA context), one layer benchmark (fp64 check,
# first call, do_bench 25 + 100 ms, 22 rounds), one torch.compile graph (forward and
# backward, Inductor on 16 cores), one training step benchmark (model build and move,
# fp32 + bf16 check, do_bench 100 + 800 ms, 4 rounds), one CUDA test (JIT compile).
EST_START_S = 15.0
EST_LAYER_S = 1.5
EST_COMPILE_S = 25.0
EST_STEP_S = 5.0
EST_TEST_S = 1.5
# test_step_table, per dataset: each provider's model build and check (stage 4b on the
# H200: 2.2 s per test_step benchmark, ~1.1 s of it timing), and one round of its
# providers' steps, which grows with the class count (H200, test_step's medians: 0.22-
# 0.29 s with up to 397 classes, 0.52 s with ImageNet's 1000).
EST_TABLE_BUILD_S = 1.5
EST_TABLE_ROUND_S = 0.25
EST_TABLE_ROUND_PER_1000_CLASSES_S = 0.27
GPU_WORKERS = 8  # pytest-xdist workers on the GPU machine (16 cores)


def _fn(item: dict) -> str:
    return item["function"]


def _p(item: dict, key: str, default: object = None) -> object:
    return item["params"].get(key, default)


def _bf16_fwdbwd_layer(item: dict) -> bool:
    # test_layer_no_dropout runs bf16 forward+backward only, so it has neither parameter.
    return (
        _fn(item) in LAYER_FUNCTIONS
        and _p(item, "dtype", "bf16") == "bf16"
        and _p(item, "mode", "fwd+bwd") == "fwd+bwd"
    )


def _rank_sweep_duplicate(item: dict) -> bool:
    # The sweep's r = 2 point is the main matrix's ViT-B/16 qkv bf16 fwd+bwd group (stage 2).
    return _fn(item) == "test_layer_rank_sweep" and _p(item, "rank") == 2


@dataclass(frozen=True)
class Stage:
    key: str
    name: str
    what: str
    cap_s: int  # its own time limit on the GPU (also clipped to what is left of the budget)
    bundle: str  # the file in $OUT it lands in
    select: Callable[[dict], bool]  # which collected items (tests/ for stage 1, bench/ after)
    warm: bool = False  # compile in parallel first, then time serially
    gate: bool = False  # a failure stops the session


STAGES: tuple[Stage, ...] = (
    Stage(
        "1",
        "tests",
        "CUDA correctness tests, real shapes included (the gate)",
        # 114 s on the first H100; on a fresh H200 all 255 tests finished just past
        # 120 s and the cut came before pytest wrote its report (2026-11-26).
        180,
        "stage1-tests",
        select=lambda it: it["nodeid"].startswith("tests/"),
        gate=True,
    ),
    Stage(
        "2",
        "layer",
        "layer ratios: ViT-B/16 qkv + out_proj, bf16, p 0.25 and 0, every provider, eager and CUDA-graphed",
        180,
        "stage2-layer",
        select=lambda it: (
            (_bf16_fwdbwd_layer(it) and _p(it, "shape") in HEADLINE_SHAPES)
            or _fn(it) in ("test_layer_graph", "test_layer_profile")
        ),
        warm=True,
    ),
    Stage(
        "2h",
        "host",
        "layer host time per call: real launches on tiny shapes (and the CPU stub), fused ÷ F.linear",
        60,
        "stage2-layer",
        select=lambda it: _fn(it) in ("test_host_path_cuda", "test_host_path"),
    ),
    Stage(
        "3",
        "step",
        "training step: EuroSAT, DTD, ImageNet; fused, plain, frozen, official, fused+bucket+half; peak memory",
        180,
        "stage3-step",
        select=lambda it: (
            _fn(it) == "test_step"
            and _p(it, "work") in HEADLINE_DATASETS
            and _p(it, "provider") in HEADLINE_STEP_PROVIDERS
        ),
    ),
    Stage(
        "3o",
        "options",
        "step options on ImageNet, interleaved: trimmed, bucketed, half-stored, compiled towers",
        200,
        "stage3-step",
        select=lambda it: _fn(it) == "test_step_options",
    ),
    Stage(
        "3t",
        "step-table",
        "step table on all 11 datasets, interleaved: fused, plain, frozen, official, fused+bucket+half, "
        "frozen+bucket+half",
        240,
        "stage3-step",
        select=lambda it: _fn(it) == "test_step_table",
    ),
    Stage(
        "4a",
        "layer-bf16",
        "layer ratios on the other shapes (text qkv 10/100/1000 classes, ViT-L/14), bf16 fwd+bwd",
        240,
        "stage4-rest",
        select=_bf16_fwdbwd_layer,
        warm=True,
    ),
    Stage(
        "4b",
        "step-rest",
        "training step: the other datasets and eager providers (compiled steps are in 4f)",
        420,
        "stage4-rest",
        # A compiled step costs a minute of Inductor per workload: eager first, so the
        # 11-workload table fills before the compiled column does.
        select=lambda it: _fn(it) == "test_step" and "+compile" not in str(_p(it, "provider")),
    ),
    Stage(
        "4c",
        "layer-modes",
        "layer: forward and backward alone, and fp16",
        480,
        "stage4-rest",
        select=lambda it: _fn(it) == "test_layer",
        warm=True,
    ),
    Stage(
        "4d",
        "rank-sweep",
        "layer rank sweep r 1-64 (r 2 is stage 2's group)",
        240,
        "stage4-rest",
        select=lambda it: _fn(it) == "test_layer_rank_sweep" and not _rank_sweep_duplicate(it),
        warm=True,
    ),
    Stage(
        "4f",
        "step-compiled",
        "compiled step (fused+bucket+half+compile: Inductor, CUDA graphs) on every dataset, ImageNet last",
        # Each dataset compiles both towers afresh (compiled_towers resets on exit): ~55 s
        # by the estimate, 11 datasets ~620 s, more than one call holds.  Cut off at the
        # limit, the stage keeps the datasets it finished (smallest class counts first);
        # ImageNet's compiled step is 3o's.  Runs before 4e, which takes whatever is left.
        480,
        "stage4-rest",
        select=lambda it: _fn(it) == "test_step" and "+compile" in str(_p(it, "provider")),
    ),
    Stage("4e", "other", "every other benchmark in bench/", 300, "stage4-rest", select=lambda it: True, warm=True),
)
STAGE_KEYS = tuple(s.key for s in STAGES)
DROPPED_REASON = "duplicate of stage 2's group (rank sweep r = 2 is the main matrix's ViT-B/16 qkv bf16 fwd+bwd)"


def parse_stages(text: str) -> list[Stage]:
    """``"1,2,3,4"`` -> those stages in session order; ``4`` means every part 4a ... 4f."""
    wanted: set[str] = set()
    for key in (k.strip() for k in text.split(",") if k.strip()):
        # "2" also runs its appendix 2h (the host path), "3" its 3o (the step options)
        # and 3t (the interleaved step table); "4" every part 4a ... 4f.
        parts = [s.key for s in STAGES if s.key == key or (key in ("2", "3", "4") and s.key.startswith(key))]
        if not parts:
            raise ValueError(f"--stages: unknown stage {key!r}; known: {', '.join(STAGE_KEYS)} (4 = all of 4a-4f)")
        wanted.update(parts)
    return [s for s in STAGES if s.key in wanted]


def assign(items: list[dict]) -> tuple[dict[str, list[str]], list[str]]:
    """Each collected benchmark to the first stage that selects it: (``key -> node ids``, dropped ids)."""
    by_stage: dict[str, list[str]] = {s.key: [] for s in STAGES}
    dropped = []
    for item in items:
        if _rank_sweep_duplicate(item):
            dropped.append(item["nodeid"])
            continue
        stage = next(s for s in STAGES if s.select(item))  # 4e takes whatever is left
        by_stage[stage.key].append(item["nodeid"])
    # The rest of the step table: the headline ratios' providers (fused, plain, frozen) on
    # every dataset before the other providers, so a stage cut off at its limit still
    # has the per-dataset plain ÷ fused of the step target (pytest runs node ids in the
    # order given).  Stable: each group keeps the collection order.
    provider = {it["nodeid"]: _p(it, "provider") for it in items}
    by_stage["4b"].sort(key=lambda i: provider[i] not in ("fused", "plain", "frozen"))
    # The compiled steps: the fewest classes (the cheapest text-tower compile) first, so a
    # stage cut off at its limit has covered the most datasets; ImageNet (3o has it) last.
    from .workloads import DATASETS

    work = {it["nodeid"]: str(_p(it, "work")) for it in items}
    by_stage["4f"].sort(key=lambda i: (work[i] == "ImageNet", DATASETS.get(work[i], 0)))
    return by_stage, dropped


def estimate_s(stage: Stage, items: list[dict], workers: int) -> float:
    """Expected device time of a stage from its item count (see the EST_* constants)."""
    if not items:
        return 0.0
    if stage.key == "1":
        return EST_START_S + EST_TEST_S * len(items) / max(1, workers) + 2 * EST_COMPILE_S
    layer = [it for it in items if _fn(it) not in STEP_FUNCTIONS]
    steps = len(items) - len(layer)
    compiles = sum(1 for it in layer if _p(it, "provider") == "plain+compile")
    # A compiled step: both towers, forward and backward (about two layer graphs' worth
    # each); test_step_options compiles one step of its own.
    compiles += 2 * sum(
        1
        for it in items
        if (_fn(it) == "test_step" and "+compile" in str(_p(it, "provider"))) or _fn(it) == "test_step_options"
    )
    compile_s = EST_COMPILE_S * compiles / (max(1, workers) if stage.warm else 1)
    warm_start = EST_START_S if stage.warm else 0.0
    table = [it for it in items if _fn(it) == "test_step_table"]
    est = EST_START_S + warm_start + EST_LAYER_S * len(layer) + compile_s + EST_STEP_S * (steps - len(table))
    return est + sum(_step_table_s(str(_p(it, "work"))) for it in table)


def _step_table_s(dataset: str) -> float:
    """Expected seconds of test_step_table on ``dataset`` (GPU, full size): its models'
    builds and checks, the warm-up round and the timed rounds."""
    from .workloads import DATASETS, STEP_TABLE_PROVIDERS, STEP_TABLE_ROUNDS

    per_round = EST_TABLE_ROUND_S + EST_TABLE_ROUND_PER_1000_CLASSES_S * DATASETS.get(dataset, 1000) / 1000
    return EST_TABLE_BUILD_S * len(STEP_TABLE_PROVIDERS) + (STEP_TABLE_ROUNDS["cuda"] + 1) * per_round


# =============================================================================
# Running one stage
# =============================================================================


@dataclass
class Run:
    rc: int | None
    timed_out: bool
    seconds: float


def run_limited(
    cmd: list[str], *, log: Path, timeout: float, env: dict[str, str], grace: float = 30.0, echo: bool = True
) -> Run:
    """Run ``cmd`` with its output teed to ``log``; at ``timeout`` send SIGINT (Ctrl-C) to
    its process group, so pytest ends its session and writes what it has, then SIGKILL
    after ``grace`` seconds."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sink.write(line)
                sink.flush()
                if echo:
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
    return Run(proc.returncode, timed_out, time.monotonic() - start)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def junit_counts(path: Path) -> dict[str, int]:
    """passed / failed / skipped test counts, and those of the real-shape CUDA tests, from a JUnit XML."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "real_shape_passed", "real_shape_not_passed"), 0)
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        counts[outcome] += 1
        if case.get("name", "").startswith(REAL_SHAPE_TESTS):
            counts["real_shape_passed" if outcome == "passed" else "real_shape_not_passed"] += 1
    return counts


def gate_verdict(run: Run, counts: dict[str, int], *, cuda: bool) -> str | None:
    """Why stage 1 does not let the session go on, or None when it does.

    A failure stops the session.  So does a stage cut off at its limit before it ran
    every real-shape test (they run first); cut off later, with no failure, it goes on:
    each benchmark still checks its provider against the fp64 reference before timing.
    """
    if counts["failed"] or (run.rc != 0 and not run.timed_out):
        return f"pytest exit code {run.rc}, {counts['failed']} failed"
    if run.timed_out and counts["passed"] == 0:
        return f"no test finished within the stage's time limit ({run.seconds:.0f} s)"
    if cuda and (counts["real_shape_passed"] == 0 or counts["real_shape_not_passed"]):
        return (
            f"the real-shape CUDA tests did not all run and pass ({counts['real_shape_passed']} passed, "
            f"{counts['real_shape_not_passed']} skipped or failed)"
        )
    return None


def benchmark_count(path: Path) -> int:
    try:
        return len(json.loads(path.read_text()).get("benchmarks", []))
    except (OSError, ValueError):
        return 0


# =============================================================================
# Context, files, summary
# =============================================================================


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def source_fingerprint(root: Path = REPO) -> str:
    """sha256 over the project's Python and shell sources: ties results to a tree, also
    where the copy sent to the GPU machine has no ``.git``."""
    h = hashlib.sha256()
    files = [root / "setup.py"] + sorted(
        p
        for d in ("lora_kernels", "clip_lora", "bench", "tests")
        for p in (root / d).rglob("*")
        if p.suffix in (".py", ".sh")
    )
    for p in files:
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine_context() -> dict[str, object]:
    """GPU, driver, versions, date and source fingerprint (run in the session's Python)."""
    import platform

    import numpy
    import torch
    import triton

    ctx: dict[str, object] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "source_fingerprint": source_fingerprint(),
    }
    try:
        import open_clip

        ctx["open_clip"] = open_clip.__version__
    except ImportError as err:
        ctx["open_clip"] = f"missing ({err})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        ctx.update(
            device=torch.cuda.get_device_name(0),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            ctx["driver"] = q.stdout.strip() or None
    else:
        ctx["device"] = f"CPU ({os.cpu_count()} cores)"
    return ctx


def results_name(context: dict) -> str:
    """``<gpu>-<yyyymmdd>``, the folder under bench/results/."""
    device = re.sub(r"[^A-Za-z0-9._-]+", "-", str(context.get("device", "unknown"))).strip("-")
    return f"{device}-{str(context.get('date', ''))[:10].replace('-', '')}"


def bundle(out: Path, name: str, folders: Iterable[Path]) -> Path:
    """``out/<name>.tar.gz`` holding ``folders`` (written to a temp name, then renamed)."""
    path = out / f"{name}.tar.gz"
    tmp = out / f".{name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for folder in folders:
            if folder.exists():
                tar.add(folder, arcname=folder.name)
    tmp.replace(path)
    return path


def load_groups(paths: Iterable[Path]) -> dict[str, dict[str, dict]]:
    """``group -> provider -> {time_ms, peak_mem_mb, ratios}`` from pytest-benchmark JSONs
    (``ratios``: an interleaved benchmark's, else None)."""
    groups: dict[str, dict[str, dict]] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            t = info.get("time_ms")
            if t is None and b.get("stats"):
                t = b["stats"]["median"] * 1e3
            if t is not None and "provider" in info:
                groups.setdefault(b["group"], {})[info["provider"]] = {
                    "time_ms": t,
                    "peak_mem_mb": info.get("peak_mem_mb"),
                    "ratios": info.get("ratios"),
                }
    return groups


def headline(groups: dict[str, dict[str, dict]]) -> list[dict]:
    """The issue's ratios (DESIGN.md section 4), each from one group of one run."""
    rows = []

    def add(label: str, group: str, num: str, den: str, target: str, key: str = "time_ms") -> None:
        g = groups.get(group, {})
        a, b = g.get(num, {}).get(key), g.get(den, {}).get(key)
        rows.append(
            {
                "ratio": label,
                "group": group,
                "value": a / b if a is not None and b else None,
                "target": target,
            }
        )

    for shape in HEADLINE_SHAPES:
        for p in (0.25, 0.0):
            group = f"layer {shape} bf16 r2 p{p} fwd+bwd"
            add("fused ÷ frozen", group, "fused", "frozen", "≤ 1.15")
            add("plain ÷ fused", group, "plain", "fused", "≥ 1.8")
            add("official-style ÷ fused", group, "official-style", "fused", "≥ 3")
            add("plain+compile ÷ fused", group, "plain+compile", "fused", "≥ 1.3")
            # The kernels alone (CUDA-graph replays): no host time on either side.
            graphed = f"{group} graph"
            add("fused ÷ frozen (graphs)", graphed, "fused", "frozen", "≤ 1.15")
            add("plain ÷ fused (graphs)", graphed, "plain", "fused", "≥ 1.8")
            # The split backward's A/B (lora_kernels/split_backward.py): above 1 it wins.
            add("fused ÷ fused+split (graphs)", graphed, "fused", "fused+split", "none (A/B)")
    for dataset in HEADLINE_DATASETS:
        add("step plain ÷ fused", f"step {dataset}", "plain", "fused", "≥ 1.25")
        add("step fused ÷ frozen", f"step {dataset}", "fused", "frozen", "none (the floor is 1)")
        add("step official ÷ fused+bucket+half", f"step {dataset}", "official", "fused+bucket+half", "none")
    add("peak memory fused ÷ plain", "step ImageNet", "fused", "plain", "≤ 0.8", key="peak_mem_mb")
    # The interleaved step table (stage 3t): its per-dataset plain ÷ fused of minimum wall times.
    from .workloads import DATASETS

    for group in (f"step table {d}" for d in DATASETS if f"step table {d}" in groups):
        ratios = groups[group].get("interleaved", {}).get("ratios") or {}
        value = ratios.get("plain ÷ fused", {}).get("wall_ratio")
        rows.append({"ratio": "step plain ÷ fused (interleaved)", "group": group, "value": value, "target": "≥ 1.25"})
    return rows


def print_headline(rows: list[dict], dry_run: bool = False) -> None:
    what = "CPU dry run at reduced sizes: not a performance claim" if dry_run else "one run"
    print(f"\nheadline ratios ({what}; see session.json and the stage bundles):")
    for r in rows:
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        print(f"  {r['group']:<50} {r['ratio']:<34} {value:>7}  target {r['target']}")


# =============================================================================
# The session
# =============================================================================


@dataclass
class StageResult:
    key: str
    name: str
    status: str  # passed, failed, timeout, skipped
    seconds: float = 0.0
    timeout_s: float = 0.0
    items: int = 0
    estimate_s: float = 0.0
    note: str = ""
    counts: dict = field(default_factory=dict)


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.start = time.monotonic()
        self.budget = args.budget
        self.scale = args.cap_scale
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the GPU code path's CPU twin, at reduced sizes
        self.env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it where there is no GPU
        self.py = sys.executable
        self.results: list[StageResult] = []
        self.summary: dict[str, object] = {}

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def save(self) -> None:
        self.summary["stages"] = [asdict(r) for r in self.results]
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        _write_json(self.out / "session.json", self.summary)

    def pytest(self, args: list[str], *, log: Path, timeout: float, echo: bool = True) -> Run:
        cmd = [self.py, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", *args]
        return run_limited(cmd, log=log, timeout=timeout, env=self.env, echo=echo)

    def workers(self) -> int:
        """pytest-xdist workers for the tests and the warm-ups; 0 where xdist is missing."""
        if subprocess.run([self.py, "-c", "import xdist"], capture_output=True, env=self.env).returncode != 0:
            return 0
        if self.args.workers is not None:
            return self.args.workers
        return 2 if self.dry else min(GPU_WORKERS, max(1, (os.cpu_count() or 2) // 2))

    # --- stage 0: context, collection, plan ------------------------------------
    def setup(self, stages: list[Stage]) -> list[tuple[Stage, list[str], float]] | None:
        d = self.work / "stage0-setup"
        d.mkdir(parents=True, exist_ok=True)
        ctx = subprocess.run(
            [self.py, "-m", "bench.gpu_session", "context"], cwd=REPO, env=self.env, capture_output=True, text=True
        )
        if ctx.returncode != 0:
            print(ctx.stdout + ctx.stderr)
            print("gpu_session: cannot import torch, triton and numpy in this Python; nothing was run")
            return None
        context = json.loads(ctx.stdout)
        context["dry_run"] = self.dry
        self.cuda = not str(context["device"]).startswith("CPU (")
        if not self.dry and not self.cuda:
            print("gpu_session: no CUDA device here; rehearse with --dry-run")
            return None
        self.summary = {"context": context, "results_name": results_name(context), "budget_s": self.budget}
        print(
            "context: "
            + ", ".join(f"{k} {context.get(k)}" for k in ("device", "torch", "triton", "numpy", "open_clip"))
        )
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
            (d / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr)
        pip = subprocess.run([self.py, "-m", "pip", "list"], capture_output=True, text=True, env=self.env)
        (d / "pip-list.txt").write_text(pip.stdout + pip.stderr)

        collected = d / "collected.json"
        col = self.pytest(
            [
                "bench/",
                *TEST_FILES,
                "--collect-only",
                "-q",
                "-m",
                "not slow",
                "-p",
                "bench.gpu_session",
                f"--gpu-session-collect={collected}",
            ],
            log=d / "collect.log",
            timeout=180,
            echo=False,
        )
        if col.rc != 0 or not collected.exists():
            print("gpu_session: collecting tests and bench/ failed (see stage0-setup/collect.log); nothing was run")
            bundle(self.out, "stage0-setup", [d])
            return None
        items = json.loads(collected.read_text())
        by_id = {it["nodeid"]: it for it in items}
        assigned, dropped = assign(items)
        self.summary["dropped"] = {"reason": DROPPED_REASON, "nodeids": dropped}
        self.n_workers = self.workers()
        plan = []
        for stage in stages:
            ids = assigned[stage.key]
            # A dry run prints the GPU machine's expectation (16 cores: 8 workers), not the CPU's.
            workers = GPU_WORKERS if self.dry else self.n_workers
            plan.append((stage, ids, estimate_s(stage, [by_id[i] for i in ids], workers)))
            (d / f"stage{stage.key}.ids").write_text("".join(f"{i}\n" for i in ids))
        self.summary["plan"] = [
            {
                "stage": s.key,
                "name": s.name,
                "what": s.what,
                "items": len(ids),
                "estimate_s": round(e),
                "cap_s": s.cap_s,
            }
            for s, ids, e in plan
        ]
        print(
            f"\nplan: expected device time per stage on the GPU (estimates until a run measures them; "
            f"{self.n_workers} xdist workers here)"
        )
        for stage, ids, est in plan:
            print(
                f"  stage {stage.key:<3} {stage.name:<12} ~{est:4.0f} s  limit {stage.cap_s * self.scale:4.0f} s  "
                f"{len(ids):3d} {'tests' if stage.key == '1' else 'benchmarks'}: {stage.what}"
            )
        total = sum(e for _, _, e in plan)
        print(
            f"  total ~{total:.0f} s expected; budget {self.budget:.0f} s, what does not fit is skipped "
            "(machine start and file transfer come on top)"
        )
        bundle(self.out, "stage0-setup", [d])
        self.save()
        return plan

    # --- the run --------------------------------------------------------------
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        for old in [*self.out.glob("stage*.tar.gz"), self.out / "session.json"]:
            old.unlink(missing_ok=True)  # a rerun into the same folder must not mix runs
        self.work.mkdir(parents=True, exist_ok=True)
        stages = parse_stages(self.args.stages)
        if not self.args.no_gate and stages[0].key != "1":
            stages.insert(0, STAGES[0])
        kind = "DRY RUN on CPU at reduced sizes" if self.dry else "GPU run"
        print(
            f"gpu_session: {kind}, stages {','.join(s.key for s in stages)}, budget {self.budget:.0f} s, out {self.out}"
        )
        plan = self.setup(stages)
        if plan is None:
            return 2

        status = 0
        for stage, ids, est in plan:
            timeout = min(stage.cap_s * self.scale, self.left() - self.args.reserve)
            if timeout < self.args.min_stage:
                note = f"budget spent ({self.left():.0f} s left)"
                self.results.append(
                    StageResult(stage.key, stage.name, "skipped", items=len(ids), estimate_s=round(est), note=note)
                )
                print(f"\n=== stage {stage.key} {stage.name}: skipped, {note}")
                self.save()
                continue
            print(f"\n=== stage {stage.key} {stage.name}: {stage.what} (limit {timeout:.0f} s, expected ~{est:.0f} s)")
            try:
                if stage.key == "1":
                    result = self.run_tests(stage, timeout)
                elif not ids:
                    result = StageResult(stage.key, stage.name, "skipped", note="no benchmark selected")
                else:
                    result = self.run_bench(stage, ids, timeout)
            except Exception as err:  # a broken stage must not lose the bundles of the others
                result = StageResult(stage.key, stage.name, "error", note=f"{type(err).__name__}: {err}")
            result.estimate_s, result.timeout_s = round(est), round(timeout)
            self.results.append(result)
            print(f"=== stage {stage.key} {stage.name}: {result.status} in {result.seconds:.0f} s; {result.note}")
            self.finish_bundle(stage)
            self.save()
            if result.status != "passed":
                status = 1
                if stage.gate:
                    print(f"gpu_session: stage {stage.key} did not pass; stopping: nothing is timed")
                    break

        self.summary["headline"] = headline(load_groups(sorted(self.work.glob("stage*/stage*.json"))))
        self.save()
        print_headline(self.summary["headline"], self.dry)
        print("\n  stage            status    time   limit  expected  items")
        for r in self.results:
            print(
                f"  {r.key:<3} {r.name:<12} {r.status:<8} {r.seconds:5.0f} s {r.timeout_s:5.0f} s {r.estimate_s:6.0f} s"
                f"  {r.items:5d}"
            )
        files = sorted(p.name for p in self.out.iterdir() if p.is_file())
        print(
            f"gpu_session: {self.elapsed():.0f} s of the {self.budget:.0f} s budget; {len(files)} files in {self.out}: "
            + ", ".join(files)
        )
        return status

    def run_tests(self, stage: Stage, timeout: float) -> StageResult:
        d = self.work / f"stage{stage.key}-{stage.name}"
        d.mkdir(exist_ok=True)
        junit = d / "junit.xml"
        args = [*TEST_FILES, "-q", "-m", "not slow", "-rfEs", f"--junitxml={junit}", "--durations=15"]
        args += ["-p", "bench.gpu_session", "--gpu-session-real-shapes-first"]
        if self.n_workers:
            args += ["-n", str(self.n_workers)]
        run = self.pytest(args, log=d / "tests.log", timeout=timeout)
        counts = junit_counts(junit)
        why = gate_verdict(run, counts, cuda=self.cuda)
        status = "passed" if why is None else ("timeout" if run.timed_out else "failed")
        note = why or (
            f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['real_shape_passed']} real-shape"
            + (" (cut off at the limit: the rest did not run)" if run.timed_out else "")
        )
        if why is None and not self.cuda:
            note += " (no GPU: real-shape tests skip in a dry run)"
        total = counts["passed"] + counts["failed"] + counts["skipped"]
        return StageResult(stage.key, stage.name, status, run.seconds, items=total, note=note, counts=counts)

    def run_bench(self, stage: Stage, ids: list[str], timeout: float) -> StageResult:
        d = self.work / f"stage{stage.key}-{stage.name}"
        d.mkdir(exist_ok=True)
        start = time.monotonic()
        note = ""
        if stage.warm and self.n_workers:
            # Untimed: compile every kernel and graph of the stage in parallel into the
            # on-disk Triton and Inductor caches; the timed pass then finds them there.
            warm = self.pytest(
                [*ids, "-q", "-n", str(self.n_workers), "--benchmark-disable"], log=d / "warm.log", timeout=timeout / 2
            )
            note = f"warm-up {warm.seconds:.0f} s{' (cut off)' if warm.timed_out else ''}; "
        json_path = d / f"stage{stage.key}.json"
        run = self.pytest(
            [*ids, "-q", "-rfE", "-p", "bench.gpu_session", "--benchmark-only", f"--benchmark-json={json_path}"],
            log=d / "bench.log",
            timeout=timeout - (time.monotonic() - start),
        )
        recorded = benchmark_count(json_path)
        status = "timeout" if run.timed_out else ("passed" if run.rc == 0 else "failed")
        note += f"{recorded} of {len(ids)} benchmarks recorded"
        if recorded:
            # The report is a convenience (unpack writes the full one): it must not cost the next stage.
            try:
                subprocess.run(
                    [self.py, "-m", "bench.report", str(json_path), "--out", str(d / "report")],
                    cwd=REPO,
                    env=self.env,
                    capture_output=True,
                    timeout=max(5.0, min(120.0, self.left() - self.args.reserve)),
                )
            except subprocess.TimeoutExpired:
                note += "; stage report skipped (time)"
        return StageResult(
            stage.key,
            stage.name,
            status,
            time.monotonic() - start,
            items=len(ids),
            note=note,
            counts={"recorded": recorded},
        )

    def finish_bundle(self, stage: Stage) -> None:
        """(Re)write the stage's file in $OUT with every stage folder that belongs to it."""
        keys = {s.key for s in STAGES if s.bundle == stage.bundle}
        folders = [p for p in sorted(self.work.iterdir()) if p.is_dir() and p.name[5:].split("-", 1)[0] in keys]
        bundle(self.out, stage.bundle, folders)


# =============================================================================
# After the run: unpack on the CPU machine
# =============================================================================


def merge_benchmark_jsons(paths: list[Path]) -> dict:
    """One pytest-benchmark JSON from the stages' (machine info of the first; a benchmark
    that appears twice keeps its last run)."""
    merged: dict | None = None
    by_name: dict[str, dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = {k: v for k, v in data.items() if k != "benchmarks"}
        for b in data.get("benchmarks", []):
            by_name[b["fullname"]] = b
    if merged is None:
        raise ValueError("no stage JSON with benchmarks among the bundles")
    merged["benchmarks"] = list(by_name.values())
    return merged


def unpack(files_dir: Path, dest: Path | None, *, report: bool = True) -> Path:
    """The returned files into ``dest`` (default ``bench/results/<gpu>-<date>/``): stage folders,
    the merged JSON, ``report/``."""
    files_dir = Path(files_dir)
    session_path = files_dir / "session.json"
    if not session_path.exists():
        raise FileNotFoundError(f"{session_path}: not found; pass the folder the GPU run's files came back in")
    session = json.loads(session_path.read_text())
    dest = Path(dest) if dest else REPO / "bench" / "results" / session["results_name"]
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(files_dir.iterdir()):
        if f.name.endswith(".tar.gz"):
            with tarfile.open(f) as tar:
                tar.extractall(dest, filter="data")
        elif f.is_file():
            shutil.copy2(f, dest / f.name)
    stage_jsons = sorted(p for p in dest.glob("stage*/stage*.json"))
    fingerprint = session["context"].get("source_fingerprint")
    here = source_fingerprint()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    provenance = {
        "source_fingerprint": fingerprint,
        "matches_tree_at_unpack": fingerprint == here,
        "head_at_unpack": head,
    }
    if stage_jsons:
        merged = merge_benchmark_jsons(stage_jsons)
        merged["clip_lora_session"] = {"context": session["context"], "stages": session.get("stages"), **provenance}
        merged_path = dest / f"{session['results_name']}.json"
        _write_json(merged_path, merged)
    if stage_jsons and report:
        subprocess.run(
            [sys.executable, "-m", "bench.report", str(merged_path), "--out", str(dest / "report")],
            cwd=REPO,
            check=True,
        )
    print(
        f"unpacked into {dest}; source {'matches' if provenance['matches_tree_at_unpack'] else 'DIFFERS FROM'} "
        f"this tree (HEAD {head[:10]})"
    )
    print_headline(
        session.get("headline") or headline(load_groups(stage_jsons)), session["context"].get("dry_run", False)
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the staged session (bench/gpu_session.sh calls this)")
    run.add_argument("--dry-run", action="store_true", help="rehearse on CPU at reduced sizes")
    run.add_argument("--stages", default="1,2,3,4", help=f"comma list of {', '.join(STAGE_KEYS)} (4 = 4a-4f)")
    run.add_argument(
        "--no-gate", action="store_true", help="skip stage 1 (only to rerun later stages of a tested tree)"
    )
    run.add_argument(
        "--budget", type=float, default=None, help="seconds for the whole session (default 540; dry run 3600)"
    )
    run.add_argument(
        "--cap-scale", type=float, default=None, help="multiply every stage's limit (default 1; dry run 4)"
    )
    run.add_argument("--reserve", type=float, default=15.0, help="seconds kept back for bundling")
    run.add_argument("--min-stage", type=float, default=30.0, help="skip a stage with less time than this")
    run.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for tests and warm-ups")
    run.add_argument("--out", default=os.environ.get("OUT"), help="where the bundles go (default $OUT)")
    run.add_argument("--work", default=None, help="scratch folder for the stages (default /tmp/clip-lora-gpu-session)")
    sub.add_parser("context", help="print the machine context as JSON")
    up = sub.add_parser("unpack", help="turn the returned files into bench/results/<gpu>-<date>/")
    up.add_argument("files_dir", type=Path)
    up.add_argument("dest", type=Path, nargs="?")
    up.add_argument("--no-report", action="store_true", help="skip python -m bench.report")
    args = parser.parse_args(argv)

    if args.command == "context":
        print(json.dumps(machine_context()))
        return 0
    if args.command == "unpack":
        try:
            unpack(args.files_dir, args.dest, report=not args.no_report)
        except (FileNotFoundError, ValueError) as err:
            print(f"python -m bench.gpu_session unpack: {err}", file=sys.stderr)
            return 2
        return 0
    if args.budget is None:
        args.budget = 3600.0 if args.dry_run else 540.0
    if args.cap_scale is None:
        args.cap_scale = 4.0 if args.dry_run else 1.0
    if not args.out:
        args.out = "/tmp/clip-lora-gpu-dry-run" if args.dry_run else "/tmp/clip-lora-gpu-out"
    if args.work is None:
        args.work = str(Path(args.out).resolve().parent / (Path(args.out).name + "-work"))
    try:
        parse_stages(args.stages)
    except ValueError as err:
        parser.error(str(err))
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    return Session(args).run()


if __name__ == "__main__":
    sys.exit(main())
