//! The packed products against plain loops, on every kernel this CPU runs.

use super::*;

fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64).sum::<f64>() as f32;
        }
    }
    out
}

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// Every kernel this CPU runs, each checked against the reference (the names are printed:
/// `cargo test -- --nocapture` shows which ran).
fn isas() -> Vec<Isa> {
    let v = Isa::available();
    eprintln!("gemm kernels on this CPU: {}", v.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "));
    v
}

#[test]
fn matches_reference_on_ragged_shapes() {
    // m covers every row remainder, n a partial panel, k more than one depth pass.
    for &(m, n, k) in
        &[(1, 16, 8), (5, 37, 300), (7, 64, 513), (13, 3, 1), (32, 200, 576), (2, 1, 0), (19, 100, 40), (12, 129, 257)]
    {
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let want = reference(&x, m, k, &w, n);
        for isa in isas() {
            for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
                // Every kernel reads panels (`Layout`); each reads its own packing too (bf16 in
                // pairs of rows for AVX-512).
                let packings = [
                    ("panels", PackedLinear::in_panels(&w, n, k, dtype)),
                    ("own", PackedLinear::new_for(&w, n, k, dtype, isa)),
                ];
                for (layout, packed) in packings {
                    let mut got = vec![f32::NAN; m * n];
                    packed.forward_with(&x, m, &mut got, isa);
                    // bf16 weights differ from the f32 ones by up to 2^-9 relative.
                    let tol = if dtype == WeightDtype::F32 { 1e-4 } else { 4e-3 } * (k as f32).sqrt().max(1.0);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!((g - e).abs() <= tol, "{isa:?} {dtype:?} {layout} m={m} n={n} k={k} [{i}]: {g} vs {e}");
                    }
                }
            }
        }
    }
}

/// Quantized panels against the f32 reference on the dequantized weights (what the kernel
/// must equal up to summation order), every kernel, ragged shapes, depth past one pass.
#[test]
fn quantized_matches_the_dequantized_reference() {
    for &(m, n, k) in &[
        (1, 16, 32),
        (5, 37, 320),
        (7, 64, 544),
        (13, 3, 32),
        (32, 200, 576),
        (12, 129, 256),
        (19, 100, 64),
        (1, 200, 96),
        (2, 100, 288),
        (1, 48, 64),
        // From WIDEN_MIN_ROWS rows the panels are widened once per row block: past one row
        // block (MC) and one pass of depth (KC), with a ragged last panel.
        (16, 33, 288),
        (200, 70, 544),
    ] {
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        for kind in QuantKind::ALL {
            let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quant::quantize_row(kind, r)).collect();
            let mut deq = vec![0.0; n * k];
            for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
                quant::dequantize_row(kind, r, o);
            }
            let want = reference(&x, m, k, &deq, n);
            let packed = PackedLinear::from_ggml(kind, &raw, n, k).unwrap();
            assert_eq!(packed.dtype(), WeightDtype::Quant(kind));
            for isa in isas() {
                let mut got = vec![f32::NAN; m * n];
                packed.forward_with(&x, m, &mut got, isa);
                let tol = 1e-4 * (k as f32).sqrt();
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!((g - e).abs() <= tol, "{isa:?} {kind:?} m={m} n={n} k={k} [{i}]: {g} vs {e}");
                }
            }
            // Quantizing at load gives the same blocks as quantizing first.
            let mut a = vec![0.0; m * n];
            let mut b = vec![0.0; m * n];
            packed.forward_with(&x, m, &mut a, Isa::Portable);
            PackedLinear::new(&w, n, k, WeightDtype::Quant(kind)).forward_with(&x, m, &mut b, Isa::Portable);
            assert_eq!(a, b, "{kind:?}");
        }
    }
}

/// Shapes for bf16 in tile order: partial row blocks, panel pairs and groups, k not a
/// multiple of 32 (and odd), more than one task of rows and one chunk of k.
const TILE_SHAPES: [(usize, usize, usize); 9] = [
    (1, 16, 32),
    (5, 37, 100),
    (9, 40, 64),
    (16, 16, 32),
    (17, 37, 100),
    (33, 64, 576),
    (300, 200, 48),
    (64, 1, 7),
    (600, 96, 1536),
];

/// The AVX-512 kernel on bf16 in pairs of rows, in both orders (tile order is what it reads
/// where AMX runs), with f32 products: within the f32 tolerance of the reference on the
/// bf16-rounded weights.
#[test]
#[cfg(target_arch = "x86_64")]
fn pair_orders_match_the_reference() {
    if !Isa::Avx512.runs_here() {
        eprintln!("bf16 in pairs of rows: not run, this CPU has no AVX-512");
        return;
    }
    let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
    for tiles in [true, false] {
        for &(m, n, k) in &TILE_SHAPES {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let want = reference(&x, m, k, &round(&w), n);
            let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles));
            let mut got = vec![f32::NAN; m * n];
            packed.forward_with(&x, m, &mut got, Isa::Avx512);
            let tol = 1e-4 * (k as f32).sqrt().max(1.0);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= tol, "tiles {tiles} m={m} n={n} k={k} [{i}]: {g} vs {e}");
            }
            let mut row = vec![0.0; k];
            for i in [0, n / 2, n - 1] {
                packed.row(i, &mut row);
                assert_eq!(row, round(&w[i * k..(i + 1) * k]), "row {i}");
            }
        }
    }
}

/// `vdpbf16ps` on bf16 pairs (a bf16 model's products where AVX-512 BF16 runs and AMX does
/// not) against the reference on bf16-rounded activations and weights:
/// only the summation order differs.
#[test]
#[cfg(target_arch = "x86_64")]
fn bf16_pairs_match_the_bf16_reference() {
    if !(Isa::Avx512.runs_here() && bf16_dot::runs_here()) {
        eprintln!("AVX-512 BF16 products: not run, this CPU has no AVX-512 BF16");
        return;
    }
    eprintln!("AVX-512 BF16 products: run");
    let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
    for &(m, n, k) in &TILE_SHAPES {
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let want = reference(&round(&x), m, k, &round(&w), n);
        let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, false));
        let mut got = vec![f32::NAN; m * n];
        packed.tiled(&x, m, &mut got, Isa::Avx512, Operands::Bf16Pairs);
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= tol, "bf16 pairs m={m} n={n} k={k} [{i}]: {g} vs {e}");
        }
    }
    // A bf16 model's products go there at any row count, where AMX does not run.
    if !amx_runs() {
        for m in [1, 2, 16] {
            let (n, k) = (40, 64);
            let (x, w) = (data(m * k, 3), data(n * k, 4));
            let packed = PackedLinear::new_for(&w, n, k, WeightDtype::Bf16, Isa::Avx512);
            let (mut via, mut direct) = (vec![0.0; m * n], vec![0.0; m * n]);
            packed.forward_products(&x, m, &mut via, Products::Bf16);
            packed.tiled(&x, m, &mut direct, Isa::Avx512, Operands::Bf16Pairs);
            assert_eq!(via, direct, "{m} rows");
            let mut f32_products = vec![0.0; m * n];
            packed.forward_with(&x, m, &mut f32_products, Isa::Avx512);
            assert_ne!(via, f32_products, "{m} rows: the activations are rounded to bf16");
        }
    }
}

/// AMX tiles against the reference on bf16-rounded activations and weights (what the tiles
/// multiply: only the summation order differs).
#[test]
fn amx_matches_the_bf16_reference() {
    if !amx_runs() {
        eprintln!("AMX bf16 tiles: not run, this CPU or OS does not allow them (or HORAE_CPU_KERNEL caps them)");
        return;
    }
    eprintln!("AMX bf16 tiles: run");
    let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
    for &(m, n, k) in TILE_SHAPES.iter().filter(|s| s.0 >= AMX_MIN_ROWS) {
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let want = reference(&round(&x), m, k, &round(&w), n);
        let packed = PackedLinear::new(&w, n, k, WeightDtype::Bf16);
        assert!(
            matches!(packed.panels, Panels::Bf16Pairs(_, PairOrder::Tiles(_))),
            "where AMX runs, bf16 is packed in tile order"
        );
        let mut got = vec![f32::NAN; m * n];
        packed.forward_products(&x, m, &mut got, Products::Bf16);
        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            assert!((g - e).abs() <= tol, "AMX m={m} n={n} k={k} [{i}]: {g} vs {e}");
        }
    }
}

/// Decode shapes (one row block, big enough to split) in pools of 2 and 3 threads: each
/// thread's share of the panels starts inside a group of `WIDE` for some (37 or 19 panels),
/// so the tiles at a share's edges are narrow. Every layout and kernel against the reference.
#[test]
fn decode_shares_match_the_reference() {
    let round = |v: &[f32]| v.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for &(m, n, k) in &[(1, 580, 576), (3, 300, 448), (6, 37 * 16, 256)] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let check = |what: &str, packed: &PackedLinear, isa: Isa, want: &[f32], tol: f32| {
                let mut got = vec![f32::NAN; m * n];
                pool.install(|| packed.forward_with(&x, m, &mut got, isa));
                for (i, (g, e)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{what} {isa:?} {threads} threads m={m} n={n} k={k} [{i}]: {g} vs {e}"
                    );
                }
            };
            let tol = 1e-4 * (k as f32).sqrt();
            let (want, want_bf16) = (reference(&x, m, k, &w, n), reference(&x, m, k, &round(&w), n));
            for isa in Isa::available() {
                check("f32", &PackedLinear::in_panels(&w, n, k, WeightDtype::F32), isa, &want, tol);
                check("bf16", &PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16), isa, &want_bf16, tol);
                for kind in QuantKind::ALL {
                    let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quant::quantize_row(kind, r)).collect();
                    let mut deq = vec![0.0; n * k];
                    for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
                        quant::dequantize_row(kind, r, o);
                    }
                    let packed = PackedLinear::from_ggml(kind, &raw, n, k).unwrap();
                    check(kind.name(), &packed, isa, &reference(&x, m, k, &deq, n), tol);
                }
            }
            if Isa::Avx512.runs_here() {
                for (what, tiles) in [("tile order", true), ("pairs in row order", false)] {
                    let packed = PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles));
                    check(what, &packed, Isa::Avx512, &want_bf16, tol);
                }
            }
        }
    }
}

/// A decode product on two threads runs from both ends, the helper's from a warmed end
/// (`warm`): every column is still written once and right (`out` starts as NaN), for each
/// panel layout, whether the helper warmed the whole region or none of it.
#[test]
#[cfg(target_arch = "x86_64")]
fn decode_from_both_ends_covers_every_column() {
    let (n, k) = (37 * 16 + 4, 576);
    let (x, w) = (data(k, 3), data(n * k, 4));
    let round: Vec<f32> = w.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    let (want, want_bf16) = (reference(&x, 1, k, &w, n), reference(&x, 1, k, &round, n));
    let mut cases = vec![];
    for isa in isas() {
        cases.push(("f32", PackedLinear::in_panels(&w, n, k, WeightDtype::F32), isa, &want));
        cases.push(("bf16", PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16), isa, &want_bf16));
    }
    if Isa::Avx512.runs_here() {
        for (what, tiles) in [("tile order", true), ("pairs in row order", false)] {
            cases.push((what, PackedLinear::in_pairs(&w, n, k, PairOrder::new(k, tiles)), Isa::Avx512, &want_bf16));
        }
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (what, packed, isa, want) in &cases {
        for warmed in [true, false] {
            let got = pool.install(|| {
                team::step(|| {
                    if warmed {
                        packed.warm(1);
                        assert!(team::wait_warmed(std::time::Duration::from_secs(10)), "{what}: nothing warmed");
                    }
                    let mut got = vec![f32::NAN; n];
                    packed.forward_with(&x, 1, &mut got, *isa);
                    got
                })
            });
            let tol = 1e-4 * (k as f32).sqrt();
            for (i, (g, e)) in got.iter().zip(want.iter()).enumerate() {
                assert!((g - e).abs() <= tol, "{what} {isa:?} warmed {warmed} [{i}]: {g} vs {e}");
            }
        }
    }
}

#[test]
fn bf16_is_exact_for_bf16_weights() {
    // Weights already representable in bf16 give the same result as the f32 packing.
    let (m, n, k) = (9, 48, 300);
    let x = data(m * k, 3);
    let w: Vec<f32> = data(n * k, 4).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    for isa in isas() {
        let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
        PackedLinear::in_panels(&w, n, k, WeightDtype::F32).forward_with(&x, m, &mut a, isa);
        for bf16 in [
            PackedLinear::in_panels(&w, n, k, WeightDtype::Bf16),
            PackedLinear::new_for(&w, n, k, WeightDtype::Bf16, isa),
        ] {
            bf16.forward_with(&x, m, &mut b, isa);
            assert_eq!(a, b, "{isa:?}");
        }
    }
}

#[test]
fn row_recovers_the_original_matrix() {
    let (n, k) = (37, 21);
    let w: Vec<f32> = data(n * k, 5).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
    for dtype in [WeightDtype::F32, WeightDtype::Bf16] {
        for isa in isas() {
            let p = PackedLinear::new_for(&w, n, k, dtype, isa);
            let mut row = vec![0.0; k];
            for i in 0..n {
                p.row(i, &mut row);
                assert_eq!(row, &w[i * k..(i + 1) * k], "{dtype:?} {isa:?} row {i}");
            }
        }
    }
}
