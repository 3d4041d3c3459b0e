//! Drawing tokens on the GPU from the logits the model left there, so only token ids cross PCIe
//! for greedy and plain temperature / top-k / top-p / min-p sampling. Requests that need the
//! whole distribution on the host (penalties, a logit bias, logprobs, min_tokens, speculative
//! verification) are sampled by the CPU code in `sample`, as on the CPU backend.

use rand::rngs::SmallRng;
use rand::Rng;

use super::device::Gpu;
use super::ops::{self, Ptr, SampleArgs};
use crate::error::{HoraeError, Result};
use crate::sample::SamplingParams;

/// Uniforms per row: each rejection round uses one; rounds beyond the first are rare (each
/// rejected draw raises the floor past everything at or below it).
pub const ROUNDS: usize = 32;

/// Whether a request's next token can be drawn on the GPU: one plain row, nothing that adjusts
/// the logits (penalties need the token history; a logit bias is rare enough to take the host
/// path), no logprobs, and no end-of-sequence mask for min_tokens.
pub fn can_sample_on_gpu(p: &SamplingParams, rows: usize, generated: usize) -> bool {
    rows == 1 && p.logprobs.is_none() && !p.adjusts_logits() && generated >= p.min_tokens
}

/// One row to draw: its logits row and parameters, and the request's random stream.
pub struct Draw<'a> {
    pub row: usize,
    pub params: &'a SamplingParams,
    pub rng: &'a mut SmallRng,
}

/// Tokens for `draws` (in order) from the `[rows, vocab]` f32 logits at `logits`.
pub fn sample(gpu: &Gpu, logits: Ptr, vocab: usize, draws: &mut [Draw<'_>]) -> Result<Vec<u32>> {
    if draws.is_empty() {
        return Ok(Vec::new());
    }
    gpu.bind()?;
    let err = |e: cudarc::driver::DriverError| HoraeError::Cuda(format!("GPU sampling: {e:?}"));
    let (greedy, random): (Vec<usize>, Vec<usize>) = (0..draws.len()).partition(|&i| draws[i].params.is_greedy());
    let rows = |idx: &[usize]| idx.iter().map(|&i| draws[i].row as i32).collect::<Vec<i32>>();
    let mut tokens = vec![0u32; draws.len()];
    let s = &gpu.stream;
    if !greedy.is_empty() {
        let r = s.clone_htod(&rows(&greedy)).map_err(err)?;
        let out = s.alloc_zeros::<i32>(greedy.len()).map_err(err)?;
        ops::argmax(gpu, Ptr::of(gpu, &out), logits, Ptr::of(gpu, &r), greedy.len(), vocab)?;
        let got = s.clone_dtoh(&out).map_err(err)?;
        gpu.sync()?; // a copy to pageable memory may return before it lands
        for (&i, t) in greedy.iter().zip(got) {
            tokens[i] = t as u32;
        }
    }
    if !random.is_empty() {
        let r = s.clone_htod(&rows(&random)).map_err(err)?;
        let p = |f: &dyn Fn(&SamplingParams) -> f32| random.iter().map(|&i| f(draws[i].params)).collect::<Vec<f32>>();
        let temperature = s.clone_htod(&p(&|q| q.temperature)).map_err(err)?;
        let top_p = s.clone_htod(&p(&|q| q.top_p)).map_err(err)?;
        let min_p = s.clone_htod(&p(&|q| q.min_p)).map_err(err)?;
        let top_k: Vec<i32> = random.iter().map(|&i| draws[i].params.top_k.min(i32::MAX as usize) as i32).collect();
        let top_k = s.clone_htod(&top_k).map_err(err)?;
        let mut u = Vec::with_capacity(random.len() * ROUNDS);
        for &i in &random {
            u.extend((0..ROUNDS).map(|_| draws[i].rng.random::<f32>()));
        }
        let uniforms = s.clone_htod(&u).map_err(err)?;
        let out = s.alloc_zeros::<i32>(random.len()).map_err(err)?;
        let args = SampleArgs {
            temperature: Ptr::of(gpu, &temperature),
            top_k: Ptr::of(gpu, &top_k),
            top_p: Ptr::of(gpu, &top_p),
            min_p: Ptr::of(gpu, &min_p),
            uniforms: Ptr::of(gpu, &uniforms),
            rounds: ROUNDS,
        };
        ops::sample(gpu, Ptr::of(gpu, &out), logits, Ptr::of(gpu, &r), random.len(), vocab, &args)?;
        let got = s.clone_dtoh(&out).map_err(err)?;
        gpu.sync()?;
        for (&i, t) in random.iter().zip(got) {
            tokens[i] = t as u32;
        }
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_whose_logits_are_adjusted_are_sampled_on_the_host() {
        let plain = SamplingParams::default();
        assert!(can_sample_on_gpu(&plain, 1, 0));
        assert!(!can_sample_on_gpu(&plain, 2, 0), "drafts to verify");
        for p in [
            SamplingParams { logit_bias: vec![(5, 1.0)], ..Default::default() },
            SamplingParams { allowed_token_ids: Some(vec![5]), ..Default::default() },
            SamplingParams { presence_penalty: 0.5, ..Default::default() },
            SamplingParams { logprobs: Some(1), ..Default::default() },
        ] {
            assert!(!can_sample_on_gpu(&p, 1, 0), "{p:?}");
        }
        let early = SamplingParams { min_tokens: 3, ..Default::default() };
        assert!(!can_sample_on_gpu(&early, 1, 2) && can_sample_on_gpu(&early, 1, 3));
    }
}
