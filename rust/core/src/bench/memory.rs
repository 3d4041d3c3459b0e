//! The machine's memory read bandwidth, for decode (which streams every weight each step) to be
//! reported as a fraction of it.

use rayon::prelude::*;

use crate::backend::huge;

/// GB/s reading a `bytes`-byte buffer (far larger than the caches) with every thread, the best
/// of `iters` passes. Integer XOR of 64-bit words, eight lanes at a time: the compiler
/// vectorises it, so the loop is bound by loads, as decode is.
pub fn read_bandwidth_gbs(bytes: usize, iters: usize) -> f64 {
    let words = (bytes / 8).max(1 << 16);
    // On 2 MiB pages where the kernel gives them, as the packed weights are: on 4 KiB pages the
    // prefetchers stop at every page, and decode read faster than this "bandwidth".
    let mut buf = huge::zeroed::<u64>(words);
    buf.par_iter_mut().enumerate().for_each(|(i, w)| *w = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let chunk = words.div_ceil(rayon::current_num_threads() * 8).next_multiple_of(8);
    let best = (0..iters.max(1) + 1)
        .map(|_| {
            let t = std::time::Instant::now();
            let x = buf
                .par_chunks(chunk)
                .map(|c| {
                    let mut lanes = [0u64; 8];
                    for w in c.chunks_exact(8) {
                        lanes.iter_mut().zip(w).for_each(|(l, &v)| *l ^= v);
                    }
                    lanes.iter().fold(0, |a, &b| a ^ b)
                })
                .reduce(|| 0, |a, b| a ^ b);
            std::hint::black_box(x);
            t.elapsed().as_secs_f64()
        })
        .skip(1) // warm-up: the pages' first touch in the parallel pass
        .fold(f64::INFINITY, f64::min);
    (words * 8) as f64 / best / 1e9
}
