/*
 * rand.h - the one pseudo-random generator of omnimoe: xorshift64* with a 64-bit state that
 * fits in a checkpoint, uniform floats and Box-Muller normals. Parameter initialisation runs
 * on the host with it for the CPU and the CUDA trainer alike, so both start from the same
 * weights for the same seed. Sampling and data shuffling draw from their own states.
 *
 * Jump-ahead (docs/design.md §1.3): the state transition of xorshift64* (the three shifts and
 * xors; the multiply only makes the output) is linear over GF(2): state' = M state for a fixed
 * 64x64 bit matrix M. RngJump holds M^(2^i) for i = 0..63, so rng_jump(rng, jump, j) puts a
 * generator where j calls of rng_u32 would have put it, in at most 64 matrix-vector products.
 * That is what lets param_init.h draw the initial weights on many threads with the bits of one.
 */
#ifndef OMNIMOE_RAND_H
#define OMNIMOE_RAND_H

#include <stdint.h>
#include <stddef.h>
#include <math.h>

typedef struct {
    uint64_t state;
} Rng;

static inline void rng_init(Rng* rng, uint64_t seed) {
    // splitmix64 of the seed, so that seeds 1, 2, 3 give unrelated streams; never zero
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z = z ^ (z >> 31);
    rng->state = z ? z : 0x2545F4914F6CDD1Dull;
}

static inline uint32_t rng_u32(Rng* rng) {
    rng->state ^= rng->state >> 12;
    rng->state ^= rng->state << 25;
    rng->state ^= rng->state >> 27;
    return (uint32_t)((rng->state * 0x2545F4914F6CDD1Dull) >> 32);
}

// M^(2^i) as 64 columns each: pow[i][j] = M^(2^i) applied to the unit vector e_j (32 KiB)
typedef struct {
    uint64_t pow[64][64];
} RngJump;

// cols applied to v over GF(2): the xor of the columns j where bit j of v is set
static inline uint64_t rng_gf2_apply(const uint64_t* cols, uint64_t v) {
    uint64_t r = 0;
    for (int j = 0; j < 64; j++) {
        if ((v >> j) & 1) r ^= cols[j];
    }
    return r;
}

static inline void rng_jump_init(RngJump* jump) {
    for (int j = 0; j < 64; j++) {  // M e_j: one step of rng_u32's state update from state e_j
        uint64_t s = 1ull << j;
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        jump->pow[0][j] = s;
    }
    for (int i = 1; i < 64; i++) {  // M^(2^i) = (M^(2^(i-1)))^2, column by column
        for (int j = 0; j < 64; j++) jump->pow[i][j] = rng_gf2_apply(jump->pow[i - 1], jump->pow[i - 1][j]);
    }
}

// advances the generator by `steps` calls of rng_u32 (2 per pair of rng_normal values)
static inline void rng_jump(Rng* rng, const RngJump* jump, uint64_t steps) {
    for (int i = 0; i < 64; i++) {
        if ((steps >> i) & 1) rng->state = rng_gf2_apply(jump->pow[i], rng->state);
    }
}

// uniform in [0, 1) with 24 bits
static inline float rng_f32(Rng* rng) {
    return (rng_u32(rng) >> 8) / 16777216.0f;
}

// fills out[0..n) with N(mean, std^2), Box-Muller in pairs; n may be odd. Each pair takes exactly
// two rng_u32 draws (an odd n spends two on its last value too), so out[i] of an even i comes
// from draws i and i + 1 counted from the call's start.
static inline void rng_normal(Rng* rng, float* out, size_t n, float mean, float std) {
    const double two_pi = 6.283185307179586;
    for (size_t i = 0; i < n; i += 2) {
        double u1 = 1.0 - rng_f32(rng);  // (0, 1]: log never sees 0
        double u2 = rng_f32(rng);
        double r = sqrt(-2.0 * log(u1));
        out[i] = (float)(mean + std * r * cos(two_pi * u2));
        if (i + 1 < n) out[i + 1] = (float)(mean + std * r * sin(two_pi * u2));
    }
}

#endif // OMNIMOE_RAND_H
