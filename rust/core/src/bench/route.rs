//! Routing cost (run by `horae bench route`): one routing decision per router, with `replicas`
//! replicas each publishing a prefix-cache index of `cached_blocks` hashes, for a request of
//! `prompt_blocks` blocks (a 40k-token Mooncake prompt is 2,500 blocks of 16).

use std::time::Instant;

use rand::{rngs::SmallRng, Rng, SeedableRng};

use crate::route::{ReplicaStats, RouteRequest, Router, RouterKind};

pub fn route_benchmark(
    replicas: usize,
    cached_blocks: usize,
    prompt_blocks: usize,
    iters: usize,
) -> Vec<(RouterKind, f64)> {
    let mut rng = SmallRng::seed_from_u64(0);
    let prompt: Vec<u64> = (0..prompt_blocks).map(|_| rng.random()).collect();
    let stats: Vec<ReplicaStats> = (0..replicas)
        .map(|k| {
            // Replica k holds a different share of the prompt's prefix, and other content.
            let share = prompt_blocks * k / replicas.max(1);
            let mut cached: rustc_hash::FxHashMap<u64, u32> = prompt[..share].iter().map(|&h| (h, 0)).collect();
            while cached.len() < cached_blocks.max(share) {
                cached.insert(rng.random(), 0);
            }
            ReplicaStats {
                waiting: rng.random_range(0..4),
                running: rng.random_range(8..64),
                waiting_tokens: rng.random_range(0..50_000),
                capacity_tokens: 400_000,
                predicted_peak_tokens: rng.random_range(100_000..400_000),
                planned_output: 200,
                prefill_rate: 20_000.0,
                cached: crate::route::CachedBlocks::Index(cached),
            }
        })
        .collect();
    let req = RouteRequest {
        block_hashes: &prompt,
        block_size: 16,
        prompt_len: prompt_blocks * 16,
        max_tokens: 1024,
        ttft: Some(30.0),
    };
    RouterKind::ALL
        .into_iter()
        .map(|kind| {
            let mut router = Router::new(kind, 0);
            let iters = iters.max(1);
            let t = Instant::now();
            for k in 0..iters {
                std::hint::black_box(router.choose(&req, &stats));
                if k % 16 == 0 {
                    // Stats are republished now and then: the router's own counts start over.
                    for i in 0..replicas {
                        router.refreshed(i);
                    }
                }
            }
            (kind, t.elapsed().as_secs_f64() * 1e6 / iters as f64)
        })
        .collect()
}
