/*
 * rand.h - the one pseudo-random generator of omnimoe: xorshift64* with a 64-bit state that
 * fits in a checkpoint, uniform floats and Box-Muller normals. Parameter initialisation runs
 * on the host with it for the CPU and the CUDA trainer alike, so both start from the same
 * weights for the same seed. Sampling and data shuffling draw from their own states.
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

// uniform in [0, 1) with 24 bits
static inline float rng_f32(Rng* rng) {
    return (rng_u32(rng) >> 8) / 16777216.0f;
}

// fills out[0..n) with N(mean, std^2), Box-Muller in pairs; n may be odd
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
