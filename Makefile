# omnimoe build.
#   make                 the CUDA trainer ./train_omnimoe and the CPU reference ./train_omnimoe_cpu
#   make test            CPU tests (always) and the GPU test (when a CUDA device is present)
#   make test_omnimoe    the GPU test binary alone
#   make kernel_tests    the kernel tests of dev/cuda (test_*.cu), bf16 and fp32: dev/cuda/test_*_bin
#   make test_kernels    build and run them (when a CUDA device is present); KERNEL_TESTS="matmul adamw"
#                        picks some; make kernel_benches builds dev/cuda/bench_*_bin
# CUDA code is built for Hopper (sm_90) explicitly; it compiles and links on machines without
# a GPU. NCCL and MPI are used when a test program compiles and links against them.

CC ?= gcc
NVCC ?= nvcc
CFLAGS = -O2 -Wall -Wextra -std=c11 -fopenmp -I.
LDLIBS = -lm
CUDA_ARCH ?= -gencode=arch=compute_90a,code=sm_90a
NVCC_FLAGS = -O3 -std=c++17 $(CUDA_ARCH) -I. --expt-relaxed-constexpr -Xcompiler -Wall
NVCC_LDLIBS = -lcublasLt -lcublas -lpthread
# xxHash, used header-only (XXH_INLINE_ALL): Debian's libxxhash-dev puts it in /usr/include; a
# machine without it can get the header in carry/include/xxhash.h (carry/ is not tracked)
ifneq ($(wildcard carry/include/xxhash.h),)
  CFLAGS += -Icarry/include
  NVCC_FLAGS += -Icarry/include
endif
PRECISION ?= BF16
ifeq ($(PRECISION), FP32)
  NVCC_FLAGS += -DENABLE_FP32
endif

HASH := \#
# --- optional NCCL (multi-GPU); detected by compiling and linking a two-line program --------
NCCL_OK := $(shell d=$$(mktemp -d) && printf '$(HASH)include <nccl.h>\nint main(){ncclUniqueId id;return (int)ncclGetUniqueId(&id);}\n' \
             > $$d/probe.cu && $(NVCC) -o $$d/probe $$d/probe.cu -lnccl >/dev/null 2>&1 && echo 1; rm -rf $$d)
ifeq ($(NCCL_OK), 1)
  NVCC_FLAGS += -DMULTI_GPU
  NVCC_LDLIBS += -lnccl
endif
# --- optional MPI (launch with mpirun); its flags come from mpicc itself -------------------
MPI_CFLAGS := $(shell mpicc --showme:compile 2>/dev/null)
MPI_LIBS := $(shell mpicc --showme:link 2>/dev/null)
MPI_OK := $(shell [ -n "$(MPI_CFLAGS)$(MPI_LIBS)" ] && d=$$(mktemp -d) && printf '$(HASH)include <mpi.h>\nint main(int c,char**v){MPI_Init(&c,&v);return MPI_Finalize();}\n' \
            > $$d/probe.c && $(CC) $(MPI_CFLAGS) $$d/probe.c -o $$d/probe $(MPI_LIBS) >/dev/null 2>&1 && echo 1; rm -rf $$d)
ifeq ($(NCCL_OK)$(MPI_OK), 11)
  NVCC_FLAGS += -DUSE_MPI $(MPI_CFLAGS)
  NVCC_LDLIBS += $(MPI_LIBS)
endif

# --- optional cuDNN attention (--attention cudnn): make USE_CUDNN=1 -------------------------
# Needs the cudnn-frontend headers (PyPI's nvidia-cudnn-frontend wheel, its include/; the path
# below is where 'bash dev/bench_llmc.sh prepare' puts them) and libcudnn (the CUDA toolkit's, or
# PyPI's nvidia-cudnn-cu13 found through python3). Switching USE_CUDNN needs a rebuild (make -B).
USE_CUDNN ?= 0
CUDNN_FRONTEND_PATH ?= carry/cudnn-frontend/include
CUDNN_OBJ =
ifeq ($(USE_CUDNN), 1)
  CUDNN_PIP_DIR := $(shell python3 -c "import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__ or nvidia.cudnn.__path__[0]))" 2>/dev/null)
  CUDNN_FLAGS = -I$(CUDNN_FRONTEND_PATH)
  ifeq ($(shell printf '$(HASH)include <cudnn.h>\nint main(){return 0;}\n' | $(NVCC) -x cu - -o /dev/null -lcudnn >/dev/null 2>&1 && echo 1),1)
    NVCC_LDLIBS += -lcudnn
  else ifneq ($(CUDNN_PIP_DIR),)
    CUDNN_FLAGS += -I$(CUDNN_PIP_DIR)/include
    NVCC_LDLIBS += -L$(CUDNN_PIP_DIR)/lib -l:libcudnn.so.9 -Xlinker -rpath=$(CUDNN_PIP_DIR)/lib
  else
    $(error USE_CUDNN=1: libcudnn not found (neither with the CUDA toolkit nor as python3's nvidia.cudnn))
  endif
  ifeq ($(wildcard $(CUDNN_FRONTEND_PATH)/cudnn_frontend.h),)
    $(error USE_CUDNN=1: $(CUDNN_FRONTEND_PATH)/cudnn_frontend.h not found (set CUDNN_FRONTEND_PATH; see dev/bench_llmc.sh prepare))
  endif
  NVCC_FLAGS += -DENABLE_CUDNN
  NVCC_LDLIBS += -lnvrtc -lcuda
  CUDNN_OBJ = build/attention_cudnn.o
endif

# --- optional CUTLASS grouped GEMM of the moe experts: make USE_CUTLASS=1 ------------------
# Needs the CUTLASS 4.x headers (PyPI's nvidia-cutlass wheel, cutlass_library/source/include; the
# path below is where 'bash dev/prepare_carry.sh cutlass' puts them); header-only, no library.
# Compiles llmc/moe_gemm_cutlass.cu alone (minutes: CUTLASS templates) and selects nothing by
# itself: moe_gemm_backend in llmc/moe_experts.cuh picks it at run time (bf16 builds only).
# MOE_CUTLASS_TILE_N = 256 (default) or 128 is the tile's N, MOE_CUTLASS_PINGPONG = 1 the ping-pong schedule
# (default cooperative), MOE_CUTLASS_CLUSTER_M = 2 a cluster of two CTAs along M (default 1),
# MOE_GATHER_WARPS = 1 or 2 (default) the producer warps that do the token reads' gathers.
# Switching USE_CUTLASS or these needs a rebuild (make -B).
USE_CUTLASS ?= 0
CUTLASS_INCLUDE ?= carry/cutlass/include
MOE_CUTLASS_TILE_N ?= 256
MOE_CUTLASS_PINGPONG ?= 0
MOE_CUTLASS_CLUSTER_M ?= 1
MOE_GATHER_WARPS ?= 2
CUTLASS_DEFS = -DNDEBUG -DMOE_CUTLASS_TILE_N=$(MOE_CUTLASS_TILE_N) -DMOE_CUTLASS_PINGPONG=$(MOE_CUTLASS_PINGPONG) \
	-DMOE_CUTLASS_CLUSTER_M=$(MOE_CUTLASS_CLUSTER_M) -DMOE_GATHER_WARPS=$(MOE_GATHER_WARPS)
CUTLASS_OBJ =
ifeq ($(USE_CUTLASS), 1)
  ifeq ($(wildcard $(CUTLASS_INCLUDE)/cutlass/gemm/collective/collective_builder.hpp),)
    $(error USE_CUTLASS=1: $(CUTLASS_INCLUDE)/cutlass/gemm/collective/collective_builder.hpp not found (set CUTLASS_INCLUDE; see dev/prepare_carry.sh))
  endif
  NVCC_FLAGS += -DENABLE_CUTLASS
  CUTLASS_OBJ = build/moe_gemm_cutlass.o build/matmul_gelu_cutlass.o
endif

HOST_HEADERS = $(wildcard llmc/*.h)
CUDA_HEADERS = $(wildcard llmc/*.cuh)
DEV_CUDA_HEADERS = $(wildcard dev/cuda/*.h)
CPU_TESTS = test_omnimoe_cpu test_dataloader test_checkpoint test_args test_lr_schedule test_logger test_fixtures test_integrity \
            test_mc_eval test_loop_ranks test_mc_loop test_expert_shard test_zero_shard test_zero_ranks test_checkpoint_parts test_param_init \
            test_shard_tables

.PHONY: all cpu test test_cpu test_gpu kernel_tests kernel_benches test_kernels clean

all: train_omnimoe train_omnimoe_cpu

cpu: train_omnimoe_cpu $(CPU_TESTS)

train_omnimoe_cpu: train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_omnimoe_cpu: test_omnimoe_cpu.c train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the column-sharded expert tables with simulated ranks (llmc/expert_shard.h, docs/sharding.md §3.1)
test_expert_shard: test_expert_shard.c train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_fixtures: test_fixtures.c train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the tests of one host header each (test_checkpoint: checkpoint.h, test_args: args.h, ...)
test_dataloader test_checkpoint test_args test_lr_schedule test_logger test_mc_eval test_zero_shard test_checkpoint_parts: %: %.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the shared loop with 3 ranks as threads (llmc/train_loop.h)
test_loop_ranks: test_loop_ranks.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS) -lpthread

# the jump-ahead of rand.h and the threaded initialisation (llmc/param_init.h) against the sequential one
test_param_init: test_param_init.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS) -lpthread

# ZeRO-1 with simulated ranks on the CPU reference model against the replicated path
test_zero_ranks: test_zero_ranks.c train_omnimoe.c test_dp_ranks.h $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the column-sharded tables' trainer bookkeeping with simulated ranks (llmc/expert_shard_layout.h)
test_shard_tables: test_shard_tables.c train_omnimoe.c test_dp_ranks.h $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

test_integrity: test_integrity.c train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# --mc-eval in the loop and the trainer against an independent computation (runs train_omnimoe_cpu)
test_mc_loop: test_mc_loop.c train_omnimoe.c $(HOST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

train_omnimoe: train_omnimoe.cu $(HOST_HEADERS) $(CUDA_HEADERS) $(CUDNN_OBJ) $(CUTLASS_OBJ)
	$(NVCC) $(NVCC_FLAGS) $< $(CUDNN_OBJ) $(CUTLASS_OBJ) -o $@ $(NVCC_LDLIBS)

# cuDNN's SDPA in its own object: the cudnn-frontend headers take about a minute to compile
build/attention_cudnn.o: llmc/attention_cudnn.cu llmc/attention_cudnn.h
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) $(CUDNN_FLAGS) -diag-suppress 128,2810 -Xcompiler -Wno-deprecated-declarations -c $< -o $@

# the CUTLASS grouped GEMM in its own object (llmc/moe_gemm_cutlass.h): CUTLASS's templates take
# minutes to compile, and its headers stay out of every other translation unit
build/moe_gemm_cutlass.o: llmc/moe_gemm_cutlass.cu llmc/moe_gemm_cutlass.h llmc/moe_gemm_cutlass_kernels.hpp llmc/moe_gemm_gather_sm90.hpp \
		llmc/cutlass_strides.hpp
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -I$(CUTLASS_INCLUDE) $(CUTLASS_DEFS) -c $< -o $@

# the GELU GEMMs with CUTLASS epilogues (llmc/matmul_gelu_cutlass.h, --gelu-fusion 3), likewise alone
build/matmul_gelu_cutlass.o: llmc/matmul_gelu_cutlass.cu llmc/matmul_gelu_cutlass.h llmc/cutlass_strides.hpp
	@mkdir -p build
	$(NVCC) $(NVCC_FLAGS) -I$(CUTLASS_INCLUDE) -DNDEBUG -c $< -o $@

test_omnimoe: test_omnimoe.cu train_omnimoe.cu train_omnimoe.c $(HOST_HEADERS) $(CUDA_HEADERS) $(CUDNN_OBJ) $(CUTLASS_OBJ)
	$(NVCC) $(NVCC_FLAGS) -Xcompiler -fopenmp $< $(CUDNN_OBJ) $(CUTLASS_OBJ) -o $@ $(NVCC_LDLIBS) -lgomp

# the same test with floatX = float: tight tolerances
test_omnimoe_fp32: test_omnimoe.cu train_omnimoe.cu train_omnimoe.c $(HOST_HEADERS) $(CUDA_HEADERS)
	$(NVCC) $(NVCC_FLAGS) -DENABLE_FP32 -Xcompiler -fopenmp $< -o $@ $(NVCC_LDLIBS) -lgomp

# --- kernel tests and benchmarks of dev/cuda, with the flags above -------------------------
# Each test is built twice: bf16 (dev/cuda/test_x_bin) and floatX = float (test_x_fp32_bin,
# tight tolerances); test_omni and test_experts_shard (bitwise in bf16 only) have no fp32 build.
KERNEL_TESTS ?= matmul layernorm encoder activations classifier adamw global_norm attention omni experts_shard moe
KERNEL_TEST_BINS = $(foreach t,$(KERNEL_TESTS),dev/cuda/test_$(t)_bin $(if $(filter omni experts_shard,$(t)),,dev/cuda/test_$(t)_fp32_bin))
KERNEL_BENCH_BINS = dev/cuda/bench_omni_bin dev/cuda/bench_layer_bin dev/cuda/bench_moe_bin dev/cuda/bench_gemm_energy_bin
KERNEL_LOGS = dev/cuda/build_logs

kernel_tests: $(KERNEL_TEST_BINS)

kernel_benches: $(KERNEL_BENCH_BINS)

# check_gather_copies: the CUTLASS token reads' copies replayed on the host (no GPU, no CUTLASS
# object; the CUTLASS headers only)
dev/cuda/check_gather_copies_bin: dev/cuda/check_gather_copies.cu llmc/moe_gemm_cutlass_kernels.hpp llmc/moe_gemm_gather_sm90.hpp llmc/moe_gemm_cutlass.h
	$(NVCC) $(NVCC_FLAGS) -I$(CUTLASS_INCLUDE) $(CUTLASS_DEFS) $< -o $@

dev/cuda/%_fp32_bin: dev/cuda/%.cu $(HOST_HEADERS) $(CUDA_HEADERS) $(DEV_CUDA_HEADERS)
	$(NVCC) $(NVCC_FLAGS) -DENABLE_FP32 $< -o $@ $(NVCC_LDLIBS)

dev/cuda/%_bin: dev/cuda/%.cu $(HOST_HEADERS) $(CUDA_HEADERS) $(DEV_CUDA_HEADERS) $(CUDNN_OBJ) $(CUTLASS_OBJ)
	$(NVCC) $(NVCC_FLAGS) $< $(CUDNN_OBJ) $(CUTLASS_OBJ) -o $@ $(NVCC_LDLIBS)

# runs every kernel test (fp32 attention: its --quick checks), logs in dev/cuda/build_logs/, then
# prints each program's closing "N passed, N failed" line; fails when any test fails or crashes
test_kernels:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "SKIPPED: kernel tests: no CUDA device on this machine (nvidia-smi found none)"; exit 0; fi; \
	$(MAKE) kernel_tests || exit 1; \
	mkdir -p $(KERNEL_LOGS); status=0; summary=""; \
	for bin in $(KERNEL_TEST_BINS); do \
		name=$$(basename $$bin _bin); log=$(KERNEL_LOGS)/$$name.log; args=""; \
		[ $$name = test_attention_fp32 ] && args=--quick; \
		echo "=== $$bin $$args"; \
		timeout $${TEST_TIMEOUT:-300} ./$$bin $$args > $$log 2>&1; rc=$$?; \
		grep -E "^FAIL|^performance|^SUMMARY|^$$name: " $$log; \
		line=$$(grep -E "^$$name: [0-9]+ passed, [0-9]+ failed" $$log | tail -1); \
		[ -n "$$line" ] || line="$$name: no closing line (exit $$rc; log $$log)"; \
		[ $$rc -eq 0 ] || status=1; \
		summary="$$summary$$line\n"; \
	done; \
	echo "================ kernel tests"; printf "$$summary"; \
	[ $$status -eq 0 ] && echo "kernel tests: all passed" || echo "kernel tests: SOME FAILED"; exit $$status

# The CPU tests are what CI runs; the GPU test runs only where a CUDA device answers.
test: test_cpu test_gpu

# check_memory_plan: llmc/memory_plan.h's mirror of the CUDA layers' buffer sizes against the
# layers' own functions, bf16 and fp32; it runs without a GPU but needs nvcc to build (skipped,
# with a message, where there is none)
PLAN_CHECK_BINS = dev/cuda/check_memory_plan_bin dev/cuda/check_memory_plan_fp32_bin

test_cpu: $(CPU_TESTS) train_omnimoe_cpu
	./test_dataloader
	./test_checkpoint
	./test_checkpoint_parts
	./test_args
	./test_lr_schedule
	./test_logger
	./test_mc_eval
	./test_zero_shard
	./test_zero_ranks
	./test_shard_tables
	./test_integrity
	./test_loop_ranks
	./test_param_init
	./test_mc_loop
	./test_omnimoe_cpu
	./test_expert_shard
	./test_fixtures
	bash scripts/test_resume_cpu.sh
	RESUME_FFN="moe --moepp 1 --moe-bias-rate 0.001" bash scripts/test_resume_cpu.sh
	bash scripts/test_launcher_cpu.sh
	bash scripts/test_export_cpu.sh
	bash scripts/test_study_cpu.sh
	python3 scripts/test_plan.py
	@if command -v $(NVCC) >/dev/null 2>&1; then \
		$(MAKE) $(PLAN_CHECK_BINS) && ./dev/cuda/check_memory_plan_bin && ./dev/cuda/check_memory_plan_fp32_bin; \
	else \
		echo "SKIPPED: check_memory_plan (the plan's copy of the CUDA sizes): no $(NVCC) on this machine"; \
	fi
	@if command -v $(NVCC) >/dev/null 2>&1 && [ -f $(CUTLASS_INCLUDE)/cutlass/gemm/collective/collective_builder.hpp ]; then \
		$(MAKE) dev/cuda/check_gather_copies_bin && ./dev/cuda/check_gather_copies_bin; \
	else \
		echo "SKIPPED: check_gather_copies (the CUTLASS token reads' copies on the host): no $(NVCC) or no CUTLASS headers in $(CUTLASS_INCLUDE) (bash dev/prepare_carry.sh cutlass)"; \
	fi
	bash scripts/test_hostile.sh

test_gpu:
	@if nvidia-smi -L >/dev/null 2>&1; then \
		$(MAKE) test_omnimoe && ./test_omnimoe; \
	else \
		echo "SKIPPED: GPU test (test_omnimoe): no CUDA device on this machine (nvidia-smi found none)"; \
	fi

clean:
	rm -f train_omnimoe train_omnimoe_cpu train_omnimoe_cutlass test_omnimoe test_omnimoe_fp32 $(CPU_TESTS)
	rm -f $(KERNEL_TEST_BINS) $(KERNEL_BENCH_BINS) $(PLAN_CHECK_BINS) build/attention_cudnn.o build/moe_gemm_cutlass.o
