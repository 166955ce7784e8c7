#!/usr/bin/env bash
# Builds, on a machine with Rust, the executables that tests/gpu/run.sh runs, into `.gpu/`
# (ignored by git): the GPU, backend and training test binaries, the GPU benchmark and
# `recipec`, release builds without LLVM (they need only the C library, the NVIDIA driver and
# NVRTC, which they load at run time). A GPU machine with no Rust toolchain and no network
# (such as a lent one that gets a copy of the checkout) then runs `tests/gpu/run.sh` on them.
# x86-64 Linux only; the executables find the repository's files at the path they were
# built in, which run.sh recreates (`.gpu/root`).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu
mkdir -p .gpu/bin
# RECIPEC_BUNDLE_PROFILE=dev builds them in the dev profile instead (CI checks the scripts
# this way, taking them from its workspace build with the same features, so nothing is
# rebuilt; a GPU run wants the release ones).
json=--message-format=json-render-diagnostics
if [ "${RECIPEC_BUNDLE_PROFILE:-release}" = dev ]; then
    cargo build --locked --workspace --all-targets $json >.gpu/all.json
else
    cargo test --locked --release -p tests --test gpu --test backends --test train --no-run $json >.gpu/tests.json
    cargo bench --locked -p bench --bench gpu --no-run $json >.gpu/bench.json
    cargo build --locked --release -p recipec $json >.gpu/recipec.json
fi
python3 - <<'EOF'
import glob, json, shutil
wanted = [
    ("test", {"gpu": "gpu-tests", "backends": "backends-tests", "train": "train-tests"}),
    ("bench", {"gpu": "gpu-bench"}),
    ("bin", {"recipec": "recipec"}),
]
# Whose targets: the `tests`, `bench` and `recipec` packages' (other packages have targets
# of the same names), and `recipec` itself, not its unit-test executable.
homes = {"test": "/tests/tests/", "bench": "/bench/benches/", "bin": "/recipec/src/"}
found = {}
messages = [line for path in sorted(glob.glob(".gpu/*.json")) for line in open(path)]
for kind, names in wanted:
    for line in messages:
        m = json.loads(line)
        t = m.get("target", {})
        if (m.get("reason") == "compiler-artifact" and m.get("executable") and kind in t.get("kind", [])
                and t.get("name") in names and homes[kind] in t.get("src_path", "")
                and (kind != "bin" or not m.get("profile", {}).get("test"))):
            found[names[t["name"]]] = m["executable"]
expected = {"gpu-tests", "backends-tests", "train-tests", "gpu-bench", "recipec"}
missing = expected - set(found)
if missing:
    raise SystemExit(f"bundle: cargo built no executable for {sorted(missing)}")
for name, exe in sorted(found.items()):
    shutil.copy(exe, f".gpu/bin/{name}")
EOF
rm .gpu/*.json
# Symbols stay (panics name their functions); the debug sections go.
strip --strip-debug .gpu/bin/*
for f in .gpu/bin/*; do
    if ldd "$f" | grep -q "not found\|libLLVM"; then
        echo "bundle: $f needs a library the GPU machine may lack:" >&2
        ldd "$f" >&2
        exit 1
    fi
done
echo "$PWD" >.gpu/root
{
    git rev-parse HEAD 2>/dev/null || echo unknown
    git status --porcelain 2>/dev/null | grep -v '^??' | sed 's/^/modified: /' || true
    echo "profile: ${RECIPEC_BUNDLE_PROFILE:-release}"
} >.gpu/commit
du -sh .gpu/bin/* | sed 's/^/bundle: /'
echo "bundle: $(du -sh .gpu | cut -f1) in .gpu/ (built from $(head -1 .gpu/commit)); on the GPU machine, carry .gpu and run tests/gpu/run.sh"
