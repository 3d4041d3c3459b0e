//! How long one engine step takes, without running a model.
//!
//! Two models, one interface:
//! - **Roofline** from a model and a hardware description: a step is bound either by arithmetic
//!   (weights x tokens, plus attention over the context) or by memory traffic (weights read once
//!   per step, plus each sequence's KV cache read once), whichever is slower, plus a fixed
//!   per-step overhead (scheduling, sampling, launches). Formulas in docs/simulator.md.
//! - **Linear** in the step's features, fitted by least squares to step times measured on a real
//!   engine, so that engine can be simulated.

use serde::{Deserialize, Serialize};

use crate::error::{HoraeError, Result};
use crate::stepcost::solve;
pub use crate::stepcost::StepFeatures;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_params: f64,
    pub dtype_bytes: f64,
}

impl ModelSpec {
    pub const PRESETS: [&'static str; 5] = ["llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-2-70b", "smollm2-135m"];

    pub fn preset(name: &str) -> Result<Self> {
        let m = |layers, hidden, heads, kv_heads, head_dim, params: f64, bytes| ModelSpec {
            name: name.to_string(),
            num_layers: layers,
            hidden_size: hidden,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            num_params: params,
            dtype_bytes: bytes,
        };
        Ok(match name {
            "llama-2-7b" => m(32, 4096, 32, 32, 128, 6.74e9, 2.0),
            "llama-3-8b" => m(32, 4096, 32, 8, 128, 8.03e9, 2.0),
            "llama-2-13b" => m(40, 5120, 40, 40, 128, 13.0e9, 2.0),
            "llama-2-70b" => m(80, 8192, 64, 8, 128, 68.98e9, 2.0),
            "smollm2-135m" => m(30, 576, 9, 3, 64, 1.35e8, 4.0),
            _ => {
                return Err(HoraeError::InvalidConfig(format!(
                    "unknown model preset '{name}' (known: {})",
                    Self::PRESETS.join(", ")
                )))
            }
        })
    }

    /// Bytes of K and V for one token across all layers.
    pub fn kv_bytes_per_token(&self) -> f64 {
        2.0 * (self.num_layers * self.num_kv_heads * self.head_dim) as f64 * self.dtype_bytes
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HardwareSpec {
    pub name: String,
    /// Dense 16-bit tensor FLOP/s.
    pub peak_flops: f64,
    /// Bytes per second.
    pub mem_bandwidth: f64,
    /// Fractions of peak a real engine reaches (model FLOPs and memory-bandwidth utilisation).
    pub flops_efficiency: f64,
    pub bandwidth_efficiency: f64,
    /// Seconds per step that do not scale with the batch.
    pub step_overhead: f64,
    /// GPUs the model is split over (tensor parallel): weights, KV and FLOPs split this many
    /// ways, plus two all-reduces of the activations per layer.
    pub tensor_parallel: usize,
    /// Per-GPU all-reduce bus bandwidth (bytes/s) and the fixed cost of one all-reduce.
    pub link_bandwidth: f64,
    pub link_latency: f64,
}

impl HardwareSpec {
    pub const PRESETS: [&'static str; 5] = ["a100-80gb", "a100-80gb-tp4", "h100-sxm", "h200", "cpu-2core"];

    pub fn preset(name: &str) -> Result<Self> {
        let h = |flops: f64, bw: f64, fe, be, overhead| HardwareSpec {
            name: name.to_string(),
            peak_flops: flops,
            mem_bandwidth: bw,
            flops_efficiency: fe,
            bandwidth_efficiency: be,
            step_overhead: overhead,
            tensor_parallel: 1,
            link_bandwidth: 0.0,
            link_latency: 0.0,
        };
        Ok(match name {
            "a100-80gb" => h(312e12, 2.039e12, 0.6, 0.8, 4e-3),
            // Four A100s on NVLink 3 (the paper's 70B setup): about 240 GB/s of all-reduce bus
            // bandwidth per GPU as NCCL measures it, and ~20 us per small all-reduce.
            "a100-80gb-tp4" => HardwareSpec {
                tensor_parallel: 4,
                link_bandwidth: 240e9,
                link_latency: 20e-6,
                ..h(312e12, 2.039e12, 0.6, 0.8, 6e-3)
            },
            "h100-sxm" => h(989e12, 3.35e12, 0.5, 0.8, 3e-3),
            "h200" => h(989e12, 4.8e12, 0.5, 0.8, 3e-3),
            // The project's own 2-core machine (f32 GEMM peak measured ~190 GFLOP/s).
            "cpu-2core" => h(190e9, 20e9, 0.5, 0.5, 1e-3),
            _ => {
                return Err(HoraeError::InvalidConfig(format!(
                    "unknown hardware preset '{name}' (known: {})",
                    Self::PRESETS.join(", ")
                )))
            }
        })
    }
}

/// Two ring all-reduces of the step's activations per layer (after attention, after the MLP):
/// each moves `2 (tp - 1) / tp` of the tensor over every GPU's link. Zero without tensor parallel.
fn all_reduce_time(m: &ModelSpec, h: &HardwareSpec, num_tokens: f64) -> f64 {
    let tp = h.tensor_parallel.max(1) as f64;
    if tp <= 1.0 {
        return 0.0;
    }
    let bytes = num_tokens * m.hidden_size as f64 * m.dtype_bytes;
    let one = h.link_latency + 2.0 * (tp - 1.0) / tp * bytes / h.link_bandwidth;
    2.0 * m.num_layers as f64 * one
}

/// The linear cost model's regressors: `[1, tokens, sequences, attention pairs]`.
fn cost_row(f: &StepFeatures) -> [f64; 4] {
    [1.0, f.num_tokens, f.num_seqs, f.attention_pairs]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CostModel {
    Roofline {
        model: ModelSpec,
        hardware: HardwareSpec,
    },
    /// `t = c0 + c1 * num_tokens + c2 * num_seqs + c3 * attention_pairs`.
    Linear {
        coef: [f64; 4],
    },
}

impl CostModel {
    pub fn roofline(model: &str, hardware: &str) -> Result<Self> {
        Ok(CostModel::Roofline { model: ModelSpec::preset(model)?, hardware: HardwareSpec::preset(hardware)? })
    }

    pub fn step_time(&self, f: &StepFeatures) -> f64 {
        match self {
            CostModel::Roofline { model: m, hardware: h } => {
                let attn_flops = 4.0 * (m.num_layers * m.num_heads * m.head_dim) as f64 * f.attention_pairs;
                let flops = 2.0 * m.num_params * f.num_tokens + attn_flops;
                let kv = m.kv_bytes_per_token();
                // Weights once per step, every sequence's KV once, and the new KV written.
                let bytes = m.num_params * m.dtype_bytes + kv * f.context_tokens + kv * f.num_tokens;
                // Tensor parallel: each GPU holds and computes 1/tp of it, in step with the others.
                let tp = h.tensor_parallel.max(1) as f64;
                let compute = flops / tp / (h.peak_flops * h.flops_efficiency);
                let memory = bytes / tp / (h.mem_bandwidth * h.bandwidth_efficiency);
                h.step_overhead + compute.max(memory) + all_reduce_time(m, h, f.num_tokens)
            }
            CostModel::Linear { coef } => {
                let row = cost_row(f);
                row.iter().zip(coef).map(|(x, c)| x * c).sum::<f64>().max(0.0)
            }
        }
    }

    /// Least-squares fit of the linear model to `(features, measured seconds)` samples.
    pub fn fit_linear(samples: &[(StepFeatures, f64)]) -> Result<Self> {
        if samples.len() < 4 {
            return Err(HoraeError::InvalidConfig(format!(
                "fitting a linear cost model needs at least 4 measured steps, got {}",
                samples.len()
            )));
        }
        // Columns are scaled to unit RMS first so the normal equations stay well conditioned
        // (attention pairs reach 1e7 while the intercept is 1).
        let mut scale = [0.0f64; 4];
        for (f, _) in samples {
            for (s, x) in scale.iter_mut().zip(cost_row(f)) {
                *s += x * x;
            }
        }
        let scale = scale.map(|s| if s > 0.0 { (s / samples.len() as f64).sqrt() } else { 1.0 });
        let mut ata = [[0.0f64; 4]; 4];
        let mut atb = [0.0f64; 4];
        for (f, t) in samples {
            let row = cost_row(f);
            let x: [f64; 4] = std::array::from_fn(|i| row[i] / scale[i]);
            for i in 0..4 {
                atb[i] += x[i] * t;
                for j in 0..4 {
                    ata[i][j] += x[i] * x[j];
                }
            }
        }
        // A whisker of ridge keeps collinear features (e.g. pure decode, where seqs == tokens)
        // solvable; the least-squares answer is otherwise unchanged.
        for (i, row) in ata.iter_mut().enumerate() {
            row[i] += 1e-9 * samples.len() as f64;
        }
        let sol = solve(ata.iter().map(|r| r.to_vec()).collect(), atb.to_vec())
            .ok_or_else(|| HoraeError::InvalidConfig("measured steps do not determine a linear cost model".into()))?;
        Ok(CostModel::Linear { coef: std::array::from_fn(|i| sol[i] / scale[i]) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(seqs: usize, ctx: usize) -> StepFeatures {
        let (s, c) = (seqs as f64, ctx as f64);
        StepFeatures { num_tokens: s, num_seqs: s, context_tokens: s * (c + 1.0), attention_pairs: s * (c + 1.0) }
    }

    #[test]
    fn decode_is_memory_bound_and_matches_hand_computation() {
        let cm = CostModel::roofline("llama-2-7b", "a100-80gb").unwrap();
        let f = decode(64, 999);
        // 13.48 GB of weights + 64k tokens x 512 KiB of KV, at 80% of 2.039 TB/s, plus 4 ms.
        let kv = 2.0 * 32.0 * 32.0 * 128.0 * 2.0;
        let bytes = 6.74e9 * 2.0 + kv * 64.0 * 1000.0 + kv * 64.0;
        let expect = 4e-3 + bytes / (2.039e12 * 0.8);
        assert!((cm.step_time(&f) - expect).abs() < 1e-12, "{} vs {expect}", cm.step_time(&f));
        assert!(cm.step_time(&f) > 0.02 && cm.step_time(&f) < 0.05);
    }

    #[test]
    fn prefill_is_compute_bound_and_monotone() {
        let cm = CostModel::roofline("llama-2-7b", "a100-80gb").unwrap();
        let pre = |n: f64| StepFeatures {
            num_tokens: n,
            num_seqs: 1.0,
            context_tokens: n,
            attention_pairs: n * (n + 1.0) / 2.0,
        };
        let (a, b) = (cm.step_time(&pre(2048.0)), cm.step_time(&pre(4096.0)));
        assert!(b > 2.0 * a - 4e-3, "prefill time grows at least linearly: {a} {b}");
        // 2048 tokens x 13.5 GFLOP at 187 TFLOP/s effective ~ 0.15 s.
        assert!(a > 0.1 && a < 0.25, "{a}");
    }

    #[test]
    fn linear_fit_recovers_known_coefficients() {
        let truth = [2e-3, 5e-5, 1e-4, 3e-9];
        let model = CostModel::Linear { coef: truth };
        let mut samples = Vec::new();
        for seqs in [1usize, 3, 8, 20] {
            for ctx in [10usize, 300, 2000] {
                let mut f = decode(seqs, ctx);
                f.num_tokens += (ctx % 7 * 50) as f64; // some prefill mixed in
                f.attention_pairs += (ctx * ctx) as f64 / 3.0;
                samples.push((f, model.step_time(&f)));
            }
        }
        let CostModel::Linear { coef } = CostModel::fit_linear(&samples).unwrap() else { panic!() };
        for (c, t) in coef.iter().zip(truth) {
            assert!((c - t).abs() <= 1e-6 * t.abs().max(1e-9) + 1e-12, "{coef:?} vs {truth:?}");
        }
        assert!(CostModel::fit_linear(&samples[..3]).is_err());
    }

    #[test]
    fn tensor_parallel_splits_the_work_and_adds_all_reduces() {
        let one = CostModel::roofline("llama-2-70b", "a100-80gb").unwrap();
        let four = CostModel::roofline("llama-2-70b", "a100-80gb-tp4").unwrap();
        let f = decode(64, 999);
        // 138 GB of weights at 1.63 TB/s is ~85 ms on one GPU; a quarter on four, plus
        // 160 all-reduces of 64 x 8192 x 2 bytes (1 MiB) at ~20 us + 6.6 us each, plus 2 ms more
        // overhead.
        let ar = 160.0 * (20e-6 + 1.5 * 64.0 * 8192.0 * 2.0 / 240e9);
        let mem = |tp: f64| {
            (68.98e9 * 2.0 + 2.0 * 80.0 * 8.0 * 128.0 * 2.0 * 64.0 * 1000.0 + 2.0 * 80.0 * 8.0 * 128.0 * 2.0 * 64.0)
                / tp
                / (2.039e12 * 0.8)
        };
        assert!((one.step_time(&f) - (4e-3 + mem(1.0))).abs() < 1e-9);
        assert!((four.step_time(&f) - (6e-3 + mem(4.0) + ar)).abs() < 1e-9, "{}", four.step_time(&f));
        assert!(four.step_time(&f) < 0.4 * one.step_time(&f));
    }

    #[test]
    fn unknown_presets_are_errors() {
        assert!(CostModel::roofline("gpt-5", "a100-80gb").is_err());
        assert!(CostModel::roofline("llama-2-7b", "tpu").is_err());
    }
}
