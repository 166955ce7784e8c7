#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA differential suite (every stdlib item vs the
# interpreter, and the backend differential tests with the GPU among the backends), the CUDA
# compile check, a short training run on the GPU and the GPU benchmarks (AdamW over 256M
# parameters vs the copy bandwidth; the bf16 linear cross-entropy at the Gemma 2 2B setting). Writes a
# summary to target/gpu-summary.txt. Needs Rust, the NVIDIA driver, and Python for the
# NVRTC/ptxas wheels.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv target/gpu-venv
target/gpu-venv/bin/pip install --quiet -r tests/cuda/requirements.txt
NV="$(target/gpu-venv/bin/python -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0] + "/"))')"
export LD_LIBRARY_PATH="$NV/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$NV/cuda_nvcc/bin:$PATH"
export RECIPEC_REQUIRE_CUDA_TOOLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee target/gpu-summary.txt
cargo test --release -p tests --test gpu -- --nocapture 2>&1 | tee -a target/gpu-summary.txt
# The differential tests over every backend: with a GPU, `backends()` includes the real
# CUDA backend (index kernels, tensor-core and 16-bit matmuls, 128-bit loops, RNG).
cargo test --release -p tests --test backends 2>&1 | tail -25 | tee -a target/gpu-summary.txt
cargo test --release -p tests --test cuda nvrtc -- --nocapture 2>&1 | tail -5 | tee -a target/gpu-summary.txt
# The training state stays on the GPU: a step copies in only the batch, out only the scalars.
cargo test --release -p tests --test train device_training -- --nocapture 2>&1 | tail -5 | tee -a target/gpu-summary.txt
cargo build --release -p recipec
rm -rf target/gpu-train
target/release/recipec train recipes/tiny_gpt.recipe --steps 20 --backend cuda --out target/gpu-train 2>&1 | tail -6 | tee -a target/gpu-summary.txt
cargo bench -p bench --bench gpu 2>&1 | tail -8 | tee -a target/gpu-summary.txt
echo "summary: target/gpu-summary.txt"
