//! Reserve prompt + `max_tokens` for every admitted request: it can never run out of memory, and
//! never preempts, but it queues requests that would have fit.

use super::scheduler::{AdmissionPolicy, PoolView, SeqLoad};

#[derive(Debug, Default)]
pub struct Conservative {
    reserved_blocks: usize,
}

fn reservation(s: &SeqLoad, pool: &PoolView) -> usize {
    (s.prompt_len + s.max_tokens).div_ceil(pool.block_size)
}

impl AdmissionPolicy for Conservative {
    fn name(&self) -> &'static str {
        "conservative"
    }
    fn begin_step(&mut self, running: &mut [SeqLoad], pool: &PoolView) {
        self.reserved_blocks = running.iter().map(|s| reservation(s, pool)).sum();
    }
    fn admit(&mut self, c: &mut SeqLoad, _new_blocks: usize, pool: &PoolView) -> bool {
        let need = reservation(c, pool);
        if self.reserved_blocks + need > pool.total_blocks {
            return false;
        }
        self.reserved_blocks += need;
        true
    }
}
