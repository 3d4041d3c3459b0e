//! vLLM-style admission: take a request whenever its prompt fits now and block usage stays under a
//! watermark. Decoding then grows into the remaining blocks, and when they run out the shared
//! scheduler preempts the most recently admitted request.

use super::scheduler::{AdmissionPolicy, PoolView, SeqLoad};

#[derive(Debug)]
pub struct Aggressive {
    watermark: f64,
    planned_blocks: usize,
}

impl Aggressive {
    pub fn new(watermark: f64) -> Self {
        Self { watermark, planned_blocks: 0 }
    }
}

impl AdmissionPolicy for Aggressive {
    fn name(&self) -> &'static str {
        "aggressive"
    }
    fn begin_step(&mut self, _running: &mut [SeqLoad], pool: &PoolView) {
        self.planned_blocks = pool.used_blocks;
    }
    fn admit(&mut self, _c: &mut SeqLoad, new_blocks: usize, pool: &PoolView) -> bool {
        let after = self.planned_blocks + new_blocks;
        if after as f64 > self.watermark * pool.total_blocks as f64 {
            return false;
        }
        self.planned_blocks = after;
        true
    }
}
