#!/usr/bin/env bash
# One GPU session's measurements, in budgeted stages (bench/gpu_session.py says what each
# stage runs): 1 the CUDA correctness tests (the gate: if one fails, nothing is timed),
# 2 the headline layer ratios, 3 the training step on EuroSAT/DTD/ImageNet (then 3o the step
# options and 3t the interleaved step table on all 11 datasets), 4a-4f the rest of bench/
# as long as the budget lasts.  Each stage runs under its own time limit and
# leaves its bundle in $OUT before the next starts, so a cut-off run still returns what it
# measured.  It prints the expected device time per stage before it starts.
#
# Launch on the offline GPU machine (the device tool's `run`; ../shared/gpu/README.md):
#   once, here:  bash ../shared/gpu/wheels.sh   (open_clip wheels into .whl/, git-ignored;
#                in a git worktree run its `pip download` line by hand: it writes .git/info/exclude)
#   the call:    run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#   what ships:  the working tree of the session's checkout (commit first: the results record a
#                source fingerprint) plus .whl/; nothing is fetched there, its own torch/triton run
#   time:        the session's budget is 540 s, so its own limits fire before timeout_s; with the
#                machine's start that is about 11 of the 15 device minutes.  If stage 1 fails it
#                stops within ~2 minutes, which leaves time to fix the kernel here and rerun.
#                Measured on the first H100 session (2026-11-26): the machine started in ~25 s;
#                stages 1, 2, 2h, 3, 3o took 114, 63, 35, 65, 96 s.  Its first run failed stage 1
#                (two Triton 3.6 miscompiles); `python -m bench.gpu_probe` (see its docstring)
#                located them in two short calls, and the rerun with --budget 430 fitted the rest.
#                Second session (H200, 2026-11-26): start ~30 s; stage 1 ~125 s on a cold
#                machine (its limit is now 180 s), 34 s warm; 2, 2h, 3, 3o, 4b took 64, 32,
#                58, 106, 177 s (bench/NOTES.md section 10.1).
#   next session (bench/NOTES.md 10.7): --stages 1,2,3t --budget 560 (the gate, the layer
#                with the split backward's A/B, the interleaved 11-dataset step table)
#   later call, for the parts a first run had no time for:
#                run(command="bash bench/gpu_session.sh --stages 4b,4c,4d,4e", carry=[".whl"], timeout_s=600)
#   the step table alone (stage 3t, ~220 s expected, after the gate; in a full run it comes
#   after 3o and the 540 s budget may cut it, keeping the datasets it finished):
#                run(command="bash bench/gpu_session.sh --stages 3t", carry=[".whl"], timeout_s=600)
#   the compiled step on every dataset (stage 4f, ~620 s expected, limit 480 s: fewest classes
#   first, it keeps the datasets it finished; after a session whose stage 1 passed):
#                run(command="bash bench/gpu_session.sh --stages 4f --no-gate", carry=[".whl"], timeout_s=600)
# The script installs open_clip from .whl/ itself (pip --no-index --target) when python3
# cannot import it.  What comes back (at most 8 files): session.json (GPU, versions, date,
# plan, each stage's status and time, the headline ratios), session.log, stage0-setup,
# stage1-tests, stage2-layer, stage3-step and stage4-rest .tar.gz.  Then, here:
#   python -m bench.gpu_session unpack <files_at>      # -> bench/results/<gpu>-<date>/
# which unpacks the stages, merges their JSONs into bench/results/<gpu>-<date>/<gpu>-<date>.json
# (GPU name, versions and date inside), writes report/ (python -m bench.report), and says
# whether the source matches this tree.  Commit that folder.
#
# Rehearse on CPU first (every stage at reduced sizes, open_clip from .whl/ as there), in
# a venv like the GPU machine's (Python 3.12, torch 2.11, triton 3.6, numpy 2.5, no
# open_clip; bench/check_gpu_versions.sh builds one):
#   PYTHON=/path/to/venv/bin/python bash bench/gpu_session.sh --dry-run
# Options: --stages 1,2,3,4 (4 = 4a-4f), --budget SECONDS, --no-gate, --out DIR, --workers N.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dry=0
for a in "$@"; do [[ $a == --dry-run ]] && dry=1; done
out=${OUT:-}
[[ -z $out ]] && out=$([[ $dry == 1 ]] && echo /tmp/clip-lora-gpu-dry-run || echo /tmp/clip-lora-gpu-out)
mkdir -p "$out"

# open_clip from the carried wheels, unless this Python has it (a dry run always takes the
# wheels, as the GPU machine must).
if [[ $dry == 1 ]] || ! "$PY" -c "import open_clip" 2>/dev/null; then
  site=$([[ $dry == 1 ]] && echo "$out-site" || echo /tmp/clip-lora-site)
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_session: open_clip is missing and .whl/ has no wheels: run ../shared/gpu/wheels.sh here and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -m bench.gpu_session run --out "$out" "$@" 2>&1 | tee "$out/session.log"
exit "${PIPESTATUS[0]}"
