/*
multi_gpu.cuh - data parallelism over NCCL, one process per GPU.

Defines:
- MultiGpu                       this process's place in the job (rank, count, local GPU) and the
                                 NCCL communicator
- multi_gpu_init()               finds how the job was launched, picks and sets the GPU, builds the
                                 communicator
- multi_gpu_allreduce_avg()      floatX buffer -> its mean over all ranks, in place (one call)
- GradReducer, grad_reducer_*()  the gradient mean of training: in buckets (one NCCL group each) on a
                                 communication stream of its own, launched while the backward runs
                                 (--overlap-comm 1) or after it (0); the same calls either way. A
                                 slice added with a chunk q > 0 (ZeRO-1, llmc/zero.cuh) is
                                 reduce-scattered instead: rank r gets the mean of [r*q, (r+1)*q),
                                 and the tail [P*q, count) is all-reduced
- multi_gpu_allreduce_sum_int()  int32 buffer -> its sum over all ranks, in place (exact)
- multi_gpu_sum_doubles()        a few host doubles -> their sums over all ranks (loss, flags)
- multi_gpu_allgather_floats()   every rank's n floats -> (num_processes * n) floats, rank order
- multi_gpu_broadcast()          a device buffer of rank 0 -> the same buffer on every rank
- multi_gpu_broadcast_host()     a host buffer of rank 0 -> every rank (through the device)
- multi_gpu_barrier(), multi_gpu_finalize()

Launches (chosen in this order):
1. MPI: built with -DUSE_MPI (the Makefile adds it where mpicc works) and started by mpirun/mpiexec
   (OMPI_COMM_WORLD_SIZE or PMI_SIZE in the environment). Rank and count come from MPI, the local
   rank from MPI_Comm_split_type(SHARED), and rank 0's ncclUniqueId reaches the others by MPI_Bcast.
   Several hosts: mpirun with a hostfile, nothing else changes.
2. File: -pn <processes> -pr <rank> -pf <file>. Rank 0 writes its ncclUniqueId to <file> (through
   <file>.tmp and a rename, so no rank reads half of it); the others wait for the file (up to
   MULTI_GPU_FILE_WAIT_S seconds) and read it. After the communicator is built rank 0 deletes the
   file, and rank 0 refuses to start when the file already exists (a stale id from a crashed launch
   would hang the other ranks). Several hosts: <file> on a file system all hosts share. Under mpirun
   without MPI compiled in, -pf with the rank and count read from OMPI_COMM_WORLD_RANK/SIZE (or
   PMI_RANK/PMI_SIZE) works the same way.
3. Otherwise: one process, no NCCL at all (every call below returns at once or copies).
Local GPU: MPI's local rank; in file launches LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK,
MPI_LOCALRANKID or SLURM_LOCALID when set, else process_rank mod the number of visible GPUs.

Determinism: the gradient mean is a fixed sequence of NCCL groups (GradReducer below), each a
fixed list of in-place ncclAllReduce (ncclAvg) calls on fixed sub-ranges of the gradient buffer,
issued in the same order on every step. NCCL picks the algorithm, protocol and channel split of
each call from the sizes in its group, the topology and its version (in a group it bins the
calls of one type by size and chooses per bin), never from timing, so each element is reduced
in the same order every step and every run on the same machine and GPU count. Launching the same
groups earlier (--overlap-comm 1, while the backward still runs) or later (0) changes nothing but
when they run: the two give the same bits. A sub-range is NOT reduced like the same elements
inside one call over the whole buffer (other sizes can get another algorithm, and tree vs ring
sums 3+ ranks in another order), so the bucketing itself is fixed and shared by both modes. With
2 ranks the order does not matter anyway (x/2 + y/2 = y/2 + x/2 in floating point; ncclAvg
scales each input by 1/ranks, exact for 2 and 4, then sums). We do not pin NCCL_ALGO/NCCL_PROTO:
run-to-run reproducibility does not need it, and pinning would cost speed on some topologies;
set them yourself to reproduce bits across NCCL versions or machines (NCCL_MAX_CTAS and the like
change the channel split, hence the bits on 3+ ranks: keep them fixed between runs you compare).
Integer sums (expert counts) are exact; the scalar sums (losses, the stop flag) are doubles
reduced in NCCL's fixed order.

NVLink multicast (NVLS): multi_gpu_init sets NCCL_NVLS_ENABLE=0 unless the environment already
sets it (export NCCL_NVLS_ENABLE=1 to allow it where that is safe); the scripts export it too.

Compiled without -DMULTI_GPU (no NCCL) everything still compiles: one process works, and asking
for more (-pn > 1, or mpirun with several processes) exits with a message.
*/
#ifndef OMNIMOE_MULTI_GPU_CUH
#define OMNIMOE_MULTI_GPU_CUH

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include "cuda_utils.cuh"
#ifdef MULTI_GPU
#include <nccl.h>
#endif
#if defined(MULTI_GPU) && defined(USE_MPI)
#include <mpi.h>
#endif

#define MULTI_GPU_FILE_WAIT_S 600
#define MULTI_GPU_MAX_SCALARS 16

enum { MULTI_GPU_SINGLE = 0, MULTI_GPU_MPI = 1, MULTI_GPU_FILE = 2 };

typedef struct {
    int process_rank;    // 0 .. num_processes-1
    int num_processes;
    int local_rank;      // the GPU this process uses (index among the visible devices)
    int launch;          // MULTI_GPU_*
#ifdef MULTI_GPU
    ncclComm_t comm;
    double* scalars;     // (MULTI_GPU_MAX_SCALARS) device scratch of multi_gpu_sum_doubles
    int* flag;           // (1) device scratch of multi_gpu_barrier
#endif
} MultiGpu;

static inline const char* multi_gpu_launch_name(int launch) {
    return launch == MULTI_GPU_MPI ? "mpi" : (launch == MULTI_GPU_FILE ? "file" : "single");
}

static inline void multi_gpu_fail_(const char* fmt, const char* detail) {
    fprintf(stderr, "Error: multi-GPU setup: ");
    fprintf(stderr, fmt, detail);
    fprintf(stderr, "\n");
    exit(EXIT_FAILURE);
}

// an environment variable as a non-negative int, -1 when absent or not a number
static inline int multi_gpu_env_int_(const char* name) {
    const char* s = getenv(name);
    if (s == NULL || *s == '\0') return -1;
    char* end = NULL;
    long v = strtol(s, &end, 10);
    if (*end != '\0' || v < 0 || v > 1000000) return -1;
    return (int)v;
}

// the process count an MPI launcher announced (0: not launched by one)
static inline int multi_gpu_mpi_env_size_(void) {
    int n = multi_gpu_env_int_("OMPI_COMM_WORLD_SIZE");
    if (n < 0) n = multi_gpu_env_int_("PMI_SIZE");
    return n > 0 ? n : 0;
}
static inline int multi_gpu_mpi_env_rank_(void) {
    int r = multi_gpu_env_int_("OMPI_COMM_WORLD_RANK");
    if (r < 0) r = multi_gpu_env_int_("PMI_RANK");
    return r;
}

#ifdef MULTI_GPU
static inline void nccl_check_impl(ncclResult_t status, const char* file, int line) {
    if (status != ncclSuccess) {
        fprintf(stderr, "[NCCL ERROR] at %s:%d: %s (%d)\n", file, line, ncclGetErrorString(status), (int)status);
        exit(EXIT_FAILURE);
    }
}
#define ncclCheck(status) (nccl_check_impl((status), __FILE__, __LINE__))

// rank 0: writes the id to <path>.tmp and renames it (refuses when <path> exists: stale id)
static inline void multi_gpu_write_id_(const char* path, const ncclUniqueId* id) {
    struct stat st;
    if (stat(path, &st) == 0) {
        multi_gpu_fail_("the id file \"%s\" (-pf) already exists: an earlier launch crashed before it was removed, "
                        "or two jobs share the name. Delete it (or pick a new path per launch) and start again", path);
    }
    char tmp[1200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE* fp = fopen(tmp, "wb");
    if (fp == NULL) {
        fprintf(stderr, "Error: multi-GPU setup: cannot create \"%s\" for the NCCL id (-pf): %s\n", tmp, strerror(errno));
        exit(EXIT_FAILURE);
    }
    int ok = fwrite(id, sizeof(*id), 1, fp) == 1;
    ok &= fflush(fp) == 0;
    ok &= fsync(fileno(fp)) == 0;
    ok &= fclose(fp) == 0;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "Error: multi-GPU setup: writing the NCCL id to \"%s\" (-pf) failed: %s\n", path, strerror(errno));
        remove(tmp);
        exit(EXIT_FAILURE);
    }
}

// other ranks: wait until the complete file appears, then read it
static inline void multi_gpu_read_id_(const char* path, ncclUniqueId* id, int rank) {
    time_t start = time(NULL);
    for (;;) {
        FILE* fp = fopen(path, "rb");
        if (fp != NULL) {
            size_t got = fread(id, sizeof(*id), 1, fp);
            fclose(fp);
            if (got == 1) return;
        }
        if (difftime(time(NULL), start) > MULTI_GPU_FILE_WAIT_S) {
            fprintf(stderr, "Error: multi-GPU setup: rank %d waited %d s for rank 0 to write the NCCL id to \"%s\" "
                    "(-pf); is rank 0 running with the same -pf path (on a file system both see)?\n", rank,
                    MULTI_GPU_FILE_WAIT_S, path);
            exit(EXIT_FAILURE);
        }
        usleep(20000);
    }
}
#endif

// picks the visible GPU local_rank and checks it exists
static inline void multi_gpu_set_device_(MultiGpu* mg) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        fprintf(stderr, "Error: no CUDA device found. This is the GPU trainer; on a machine without a GPU run the "
                "CPU reference trainer ./train_omnimoe_cpu (make train_omnimoe_cpu)\n");
        exit(EXIT_FAILURE);
    }
    if (mg->local_rank < 0) mg->local_rank = mg->process_rank % count;
    if (mg->local_rank >= count) {
        fprintf(stderr, "Error: multi-GPU setup: rank %d wants GPU %d (its local rank), but this host shows %d GPU(s); "
                "start at most one process per visible GPU on each host\n", mg->process_rank, mg->local_rank, count);
        exit(EXIT_FAILURE);
    }
    cudaCheck(cudaSetDevice(mg->local_rank));
}

// returns when every rank has called it (and the work queued before on the default stream is done)
static inline void multi_gpu_barrier(const MultiGpu* mg) {
    if (mg->num_processes == 1) return;
#ifdef MULTI_GPU
    cudaCheck(cudaMemsetAsync(mg->flag, 0, sizeof(int), 0));
    ncclCheck(ncclAllReduce(mg->flag, mg->flag, 1, ncclInt32, ncclSum, mg->comm, 0));
    cudaCheck(cudaStreamSynchronize(0));
#endif
}

// requested_processes / requested_rank / id_file: the -pn / -pr / -pf flags (1 / 0 / "" = unset).
static inline void multi_gpu_init(MultiGpu* mg, int requested_processes, int requested_rank, const char* id_file) {
    memset(mg, 0, sizeof(*mg));
    setenv("NCCL_NVLS_ENABLE", "0", 0);  // no NVLink multicast unless asked for (see the top)
    mg->num_processes = 1;
    mg->local_rank = -1;
    mg->launch = MULTI_GPU_SINGLE;
    int mpi_size = multi_gpu_mpi_env_size_();
    int have_file = id_file != NULL && id_file[0] != '\0';
#if defined(MULTI_GPU) && defined(USE_MPI)
    if (mpi_size > 0) {
        if (have_file) {
            multi_gpu_fail_("started by mpirun, which already connects the processes: drop -pf \"%s\" (and -pn/-pr)",
                            id_file);
        }
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS) {
            multi_gpu_fail_("%s", "MPI_Init failed");
        }
        MPI_Comm_rank(MPI_COMM_WORLD, &mg->process_rank);
        MPI_Comm_size(MPI_COMM_WORLD, &mg->num_processes);
        MPI_Comm local;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, mg->process_rank, MPI_INFO_NULL, &local);
        MPI_Comm_rank(local, &mg->local_rank);
        MPI_Comm_free(&local);
        mg->launch = MULTI_GPU_MPI;
        if (requested_processes != 1 && requested_processes != mg->num_processes) {
            char msg[128];
            snprintf(msg, sizeof(msg), "-pn %d, but mpirun started %d processes (drop -pn under mpirun)",
                     requested_processes, mg->num_processes);
            multi_gpu_fail_("%s", msg);
        }
    }
#endif
    if (mg->launch == MULTI_GPU_SINGLE && have_file) {
        mg->launch = MULTI_GPU_FILE;
        mg->num_processes = requested_processes;
        mg->process_rank = requested_rank;
        if (mpi_size > 0 && requested_processes == 1) {  // mpirun without MPI compiled in: ranks from its env
            mg->num_processes = mpi_size;
            mg->process_rank = multi_gpu_mpi_env_rank_();
            if (mg->process_rank < 0) multi_gpu_fail_("%s", "mpirun set no OMPI_COMM_WORLD_RANK / PMI_RANK");
        }
        const char* local_names[] = {"LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
        for (int i = 0; i < 4 && mg->local_rank < 0; i++) mg->local_rank = multi_gpu_env_int_(local_names[i]);
    } else if (mg->launch == MULTI_GPU_SINGLE) {
        if (mpi_size > 1) {
            char msg[160];
            snprintf(msg, sizeof(msg), "started by mpirun with %d processes, but this build has no MPI (mpicc was not "
                     "found at build time): rebuild where mpicc works, or add -pf <shared file>", mpi_size);
            multi_gpu_fail_("%s", msg);
        }
        if (requested_processes > 1) {
            multi_gpu_fail_("%s", "-pn > 1 needs -pf <file>, the file through which the processes meet (or launch "
                            "with mpirun)");
        }
    }
    if (mg->process_rank < 0 || mg->process_rank >= mg->num_processes) {
        char msg[96];
        snprintf(msg, sizeof(msg), "rank %d is not in [0, %d) (-pr must be below -pn)", mg->process_rank,
                 mg->num_processes);
        multi_gpu_fail_("%s", msg);
    }
    multi_gpu_set_device_(mg);
    if (mg->num_processes == 1) return;
#ifdef MULTI_GPU
    ncclUniqueId id;
    if (mg->process_rank == 0) ncclCheck(ncclGetUniqueId(&id));
#if defined(USE_MPI)
    if (mg->launch == MULTI_GPU_MPI) MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
#endif
    if (mg->launch == MULTI_GPU_FILE) {
        if (mg->process_rank == 0) multi_gpu_write_id_(id_file, &id);
        else multi_gpu_read_id_(id_file, &id, mg->process_rank);
    }
    ncclCheck(ncclCommInitRank(&mg->comm, mg->num_processes, id, mg->process_rank));
    mg->scalars = (double*)cuda_malloc_or_die(MULTI_GPU_MAX_SCALARS * sizeof(double), "multi-GPU scalars");
    mg->flag = (int*)cuda_malloc_or_die(sizeof(int), "multi-GPU barrier flag");
    multi_gpu_barrier(mg);  // every rank holds the id now
    if (mg->launch == MULTI_GPU_FILE && mg->process_rank == 0) remove(id_file);
#else
    multi_gpu_fail_("%s", "this build has no NCCL (the Makefile found none), so it runs on one GPU only");
#endif
}

// ----------------------------------------------------------------------------
// collectives (no-ops on one process). Each is issued on `stream` and synchronizes nothing
// unless it says so.

// buf (n floatX, device) = mean over ranks of buf
static inline void multi_gpu_allreduce_avg(const MultiGpu* mg, floatX* buf, size_t n, cudaStream_t stream) {
    if (mg->num_processes == 1 || n == 0) return;
#ifdef MULTI_GPU
    ncclCheck(ncclAllReduce(buf, buf, n, NCCL_FLOATX, ncclAvg, mg->comm, stream));
#else
    (void)buf; (void)stream;
#endif
}

// ----------------------------------------------------------------------------
// GradReducer: the mean of the floatX gradients over the ranks, in buckets.
//
// A bucket is a list of slices (sub-ranges of the gradient buffer) whose gradients become final
// at the same point of the backward (in the trainer: one layer's share of every per-layer tensor;
// last, the embeddings and the final LayerNorm). grad_reducer_launch(b) records an event on the
// compute stream, makes the communication stream wait for it, and issues the bucket as one NCCL
// group of in-place ncclAllReduce(ncclAvg) calls, one per slice, on the communication stream: the
// compute stream goes on with the backward of the layers below meanwhile. grad_reducer_wait()
// then makes the compute stream wait for the last bucket, before the gradient norm and AdamW.
// Buckets launch in index order, every bucket once per step, all ranks alike (NCCL needs the same
// calls in the same order on every rank; a launch out of order is a bug and exits).
//
// --overlap-comm 0 launches the same buckets in the same order right after the backward
// (grad_reducer_launch_all), so both modes issue identical NCCL calls and give identical bits
// (the top of this file says why). The communication stream is created non-blocking: work on the
// legacy default stream (synchronous cudaMemcpy, stream 0) neither waits for the reductions in
// flight nor holds them up; every ordering it needs is explicit (the two events). It gets the
// highest stream priority, so its kernels take SMs as soon as the backward's blocks free them.
// Only for more than one process: on one GPU the trainer creates none and calls none of these.

#define GRAD_REDUCER_MAX_SLICES 32   // per bucket

typedef struct {
    int num_slices;
    floatX* ptr[GRAD_REDUCER_MAX_SLICES];    // in the gradient buffer, device
    size_t count[GRAD_REDUCER_MAX_SLICES];   // elements
    size_t chunk[GRAD_REDUCER_MAX_SLICES];   // 0: all-reduce; q > 0: reduce-scatter of P chunks of q + tail
} GradBucket;

typedef struct {
    const MultiGpu* mg;
    int num_buckets;
    GradBucket* buckets;     // (num_buckets) host
    int next_bucket;         // the bucket launched next in this step (they go in index order)
    cudaStream_t stream;     // the communication stream
    cudaEvent_t ready;       // compute stream -> communication stream: a bucket's gradients are final
    cudaEvent_t done;        // communication stream -> compute stream: every bucket is reduced
} GradReducer;

static inline void grad_reducer_init(GradReducer* r, const MultiGpu* mg, int num_buckets) {
    memset(r, 0, sizeof(*r));
    if (mg->num_processes < 2 || num_buckets < 1) {
        fprintf(stderr, "grad_reducer_init: needs >= 2 processes and >= 1 bucket (got %d, %d)\n", mg->num_processes,
                num_buckets);
        exit(EXIT_FAILURE);
    }
    r->mg = mg;
    r->num_buckets = num_buckets;
    r->buckets = (GradBucket*)calloc(num_buckets, sizeof(GradBucket));
    if (r->buckets == NULL) {
        fprintf(stderr, "grad_reducer_init: out of host memory\n");
        exit(EXIT_FAILURE);
    }
    int least_priority = 0, greatest_priority = 0;
    cudaCheck(cudaDeviceGetStreamPriorityRange(&least_priority, &greatest_priority));
    cudaCheck(cudaStreamCreateWithPriority(&r->stream, cudaStreamNonBlocking, greatest_priority));
    cudaCheck(cudaEventCreateWithFlags(&r->ready, cudaEventDisableTiming));
    cudaCheck(cudaEventCreateWithFlags(&r->done, cudaEventDisableTiming));
}

// appends the slice ptr[0, count) to bucket b (count 0: nothing). chunk 0: all-reduced (every rank
// gets the mean of every element); chunk q > 0 (ZeRO-1; P*q <= count): one in-place
// ncclReduceScatter gives rank r the mean of ptr[r*q, (r+1)*q), then ptr[P*q, count) is all-reduced
static inline void grad_reducer_add(GradReducer* r, int b, floatX* ptr, size_t count, size_t chunk) {
    if (count == 0) return;
    if (b < 0 || b >= r->num_buckets || r->buckets[b].num_slices == GRAD_REDUCER_MAX_SLICES) {
        fprintf(stderr, "grad_reducer_add: bucket %d of %d is out of range or full (%d slices)\n", b, r->num_buckets,
                GRAD_REDUCER_MAX_SLICES);
        exit(EXIT_FAILURE);
    }
    if (chunk * (size_t)r->mg->num_processes > count) {
        fprintf(stderr, "grad_reducer_add: %d chunks of %zu exceed the slice's %zu elements\n", r->mg->num_processes,
                chunk, count);
        exit(EXIT_FAILURE);
    }
    GradBucket* bucket = &r->buckets[b];
    bucket->ptr[bucket->num_slices] = ptr;
    bucket->count[bucket->num_slices] = count;
    bucket->chunk[bucket->num_slices] = chunk;
    bucket->num_slices++;
}

// Bucket b's gradients are final once the work queued so far on `compute` is done: reduce them on
// the communication stream from then on.
static inline void grad_reducer_launch(GradReducer* r, int b, cudaStream_t compute) {
    if (b != r->next_bucket) {
        fprintf(stderr, "grad_reducer_launch: bucket %d launched out of order (expected %d of %d)\n", b,
                r->next_bucket, r->num_buckets);
        exit(EXIT_FAILURE);
    }
    r->next_bucket++;
    cudaCheck(cudaEventRecord(r->ready, compute));
    // the wait takes the event as recorded now, so one event serves every bucket
    cudaCheck(cudaStreamWaitEvent(r->stream, r->ready, 0));
    const GradBucket* bucket = &r->buckets[b];
    if (bucket->num_slices == 0) return;
#ifdef MULTI_GPU
    ncclCheck(ncclGroupStart());
    const size_t P = (size_t)r->mg->num_processes, rank = (size_t)r->mg->process_rank;
    for (int i = 0; i < bucket->num_slices; i++) {
        floatX* ptr = bucket->ptr[i];
        size_t q = bucket->chunk[i], owned = P * q;
        if (q > 0) {  // in place: rank r's chunk receives its mean
            ncclCheck(ncclReduceScatter(ptr, ptr + rank * q, q, NCCL_FLOATX, ncclAvg, r->mg->comm, r->stream));
        }
        if (owned < bucket->count[i]) {  // the rest (the whole slice when q = 0): all-reduced
            ncclCheck(ncclAllReduce(ptr + owned, ptr + owned, bucket->count[i] - owned, NCCL_FLOATX, ncclAvg,
                                    r->mg->comm, r->stream));
        }
    }
    ncclCheck(ncclGroupEnd());
#else
    multi_gpu_fail_("%s", "grad_reducer_launch: this build has no NCCL");
#endif
}

// --overlap-comm 0: every bucket not launched yet, in order, after the work queued on `compute`
static inline void grad_reducer_launch_all(GradReducer* r, cudaStream_t compute) {
    while (r->next_bucket < r->num_buckets) grad_reducer_launch(r, r->next_bucket, compute);
}

// Work queued on `compute` from now on waits for every bucket's mean. Every bucket must have been
// launched this step; the next step starts again at bucket 0.
static inline void grad_reducer_wait(GradReducer* r, cudaStream_t compute) {
    if (r->next_bucket != r->num_buckets) {
        fprintf(stderr, "grad_reducer_wait: only %d of %d gradient buckets were launched this step\n", r->next_bucket,
                r->num_buckets);
        exit(EXIT_FAILURE);
    }
    cudaCheck(cudaEventRecord(r->done, r->stream));
    cudaCheck(cudaStreamWaitEvent(compute, r->done, 0));
    r->next_bucket = 0;
}

static inline void grad_reducer_free(GradReducer* r) {
    cudaCheck(cudaStreamSynchronize(r->stream));
    cudaCheck(cudaEventDestroy(r->ready));
    cudaCheck(cudaEventDestroy(r->done));
    cudaCheck(cudaStreamDestroy(r->stream));
    free(r->buckets);
    memset(r, 0, sizeof(*r));
}

// buf (n int32, device) = sum over ranks of buf
static inline void multi_gpu_allreduce_sum_int(const MultiGpu* mg, int* buf, size_t n, cudaStream_t stream) {
    if (mg->num_processes == 1 || n == 0) return;
#ifdef MULTI_GPU
    ncclCheck(ncclAllReduce(buf, buf, n, ncclInt32, ncclSum, mg->comm, stream));
#else
    (void)buf; (void)stream;
#endif
}

// values[0..n) (host) = their sums over ranks; waits for the result (n <= MULTI_GPU_MAX_SCALARS)
static inline void multi_gpu_sum_doubles(const MultiGpu* mg, double* values, int n, cudaStream_t stream) {
    if (mg->num_processes == 1 || n == 0) return;
    if (n > MULTI_GPU_MAX_SCALARS) {
        fprintf(stderr, "multi_gpu_sum_doubles: %d values, at most %d\n", n, MULTI_GPU_MAX_SCALARS);
        exit(EXIT_FAILURE);
    }
#ifdef MULTI_GPU
    cudaCheck(cudaMemcpyAsync(mg->scalars, values, n * sizeof(double), cudaMemcpyHostToDevice, stream));
    ncclCheck(ncclAllReduce(mg->scalars, mg->scalars, n, ncclFloat64, ncclSum, mg->comm, stream));
    cudaCheck(cudaMemcpyAsync(values, mg->scalars, n * sizeof(double), cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
#else
    (void)stream;
#endif
}

// recv (num_processes * n floats, device) = [rank 0's send, rank 1's send, ...]
static inline void multi_gpu_allgather_floats(const MultiGpu* mg, const float* send, float* recv, size_t n,
                                              cudaStream_t stream) {
    if (n == 0) return;
    if (mg->num_processes == 1) {
        cudaCheck(cudaMemcpyAsync(recv, send, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
        return;
    }
#ifdef MULTI_GPU
    ncclCheck(ncclAllGather(send, recv, n, ncclFloat, mg->comm, stream));
#endif
}

// buf (bytes, device) on every rank = rank 0's buf
static inline void multi_gpu_broadcast(const MultiGpu* mg, void* buf, size_t bytes, cudaStream_t stream) {
    if (mg->num_processes == 1 || bytes == 0) return;
#ifdef MULTI_GPU
    ncclCheck(ncclBroadcast(buf, buf, bytes, ncclUint8, 0, mg->comm, stream));
#else
    (void)buf; (void)stream;
#endif
}

// host_buf (bytes) on every rank = rank 0's; waits for the result
static inline void multi_gpu_broadcast_host(const MultiGpu* mg, void* host_buf, size_t bytes, cudaStream_t stream) {
    if (mg->num_processes == 1 || bytes == 0) return;
    void* staging = cuda_malloc_or_die(bytes, "multi-GPU broadcast staging");
    cudaCheck(cudaMemcpyAsync(staging, host_buf, bytes, cudaMemcpyHostToDevice, stream));
    multi_gpu_broadcast(mg, staging, bytes, stream);
    cudaCheck(cudaMemcpyAsync(host_buf, staging, bytes, cudaMemcpyDeviceToHost, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    cudaCheck(cudaFree(staging));
}

static inline void multi_gpu_finalize(MultiGpu* mg) {
#ifdef MULTI_GPU
    if (mg->num_processes > 1) {
        multi_gpu_barrier(mg);
        ncclCheck(ncclCommDestroy(mg->comm));
        cudaCheck(cudaFree(mg->scalars));
        cudaCheck(cudaFree(mg->flag));
    }
#if defined(USE_MPI)
    if (mg->launch == MULTI_GPU_MPI) MPI_Finalize();
#endif
#endif
    mg->num_processes = 1;
    mg->launch = MULTI_GPU_SINGLE;
}

#endif  // OMNIMOE_MULTI_GPU_CUH
