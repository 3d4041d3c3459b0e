//! Shared by the integration tests: the golden model folders, and one writer of random Llama
//! checkpoints (tiny-llama3's config with other sizes, weights named by `model::weights::names`).

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};

use horae_core::model::weights::names;
use safetensors::tensor::{Dtype, TensorView};

/// The largest absolute difference of `a` and `b`, NaN counting as infinite (`f32::max` drops
/// NaN, so NaN outputs would pass).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, |m, e| {
        if e.is_nan() || m.is_nan() {
            f32::INFINITY
        } else {
            m.max(e)
        }
    })
}

pub fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden").join(name)
}

/// The sizes of a random Llama (two layers).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub hidden: usize,
    pub inter: usize,
    pub head_dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
}

/// Write `config.json` and `model.safetensors` for a random Llama of `shape` into `dir`. Norm
/// weights are ones; every other tensor is `init(name, numel)`.
pub fn write_random_llama(dir: &Path, shape: Shape, mut init: impl FnMut(&str, usize) -> Vec<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    let text = std::fs::read_to_string(golden_dir("tiny-llama3").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let Shape { hidden: h, inter, head_dim: hd, heads: nh, kv_heads: nkv, vocab: v } = shape;
    for (key, value) in [
        ("hidden_size", h),
        ("intermediate_size", inter),
        ("head_dim", hd),
        ("num_attention_heads", nh),
        ("num_key_value_heads", nkv),
        ("vocab_size", v),
        ("num_hidden_layers", 2),
    ] {
        cfg[key] = value.into();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, ones: bool| {
        let n: usize = shape.iter().product();
        let data = if ones { vec![1.0f32; n] } else { init(&name, n) };
        assert_eq!(data.len(), n, "{name}");
        tensors.push((name, shape, data.iter().flat_map(|f| f.to_le_bytes()).collect()));
    };
    add(names::EMBED.into(), vec![v, h], false);
    add(names::NORM.into(), vec![h], true);
    for l in 0..2 {
        let p = |part: &str| names::layer(l, part);
        add(p(names::INPUT_NORM), vec![h], true);
        add(p(names::POST_NORM), vec![h], true);
        add(p(names::Q), vec![nh * hd, h], false);
        add(p(names::K), vec![nkv * hd, h], false);
        add(p(names::V), vec![nkv * hd, h], false);
        add(p(names::O), vec![h, nh * hd], false);
        add(p(names::GATE), vec![inter, h], false);
        add(p(names::UP), vec![inter, h], false);
        add(p(names::DOWN), vec![h, inter], false);
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}
