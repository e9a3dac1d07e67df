#!/usr/bin/env bash
# run_std.sh - the standard-kernel tests (matmul, layernorm, encoder, activations, classifier,
# adamw, global_norm), each in a bf16 build (tolerance 1e-2, plus benchmarks) and an fp32 build
# (tolerance 1e-5, no benchmarks), through the Makefile: `make test_kernels` builds them with the
# Makefile's flags (dev/cuda/test_*_bin, only what changed), runs them, logs each run to
# dev/cuda/build_logs/ and prints every program's closing "N passed, N failed" line last.
#
# usage: dev/cuda/run_std.sh                        build and run all
#        TESTS="matmul adamw" dev/cuda/run_std.sh   only these
# Exit status: 0 when every build and every test passed.
set -u
cd "$(dirname "$0")/../.."
exec make -s -j4 test_kernels KERNEL_TESTS="${TESTS:-matmul layernorm encoder activations classifier adamw global_norm}"
