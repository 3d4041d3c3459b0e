use super::*;

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

#[test]
fn quantize_then_dequantize_is_within_half_a_step() {
    let x = data(96, 1);
    for kind in QuantKind::ALL {
        let raw = quantize_row(kind, &x);
        assert_eq!(raw.len(), 3 * kind.block_bytes());
        let mut back = vec![0.0; 96];
        dequantize_row(kind, &raw, &mut back);
        let step = match kind {
            QuantKind::Q8_0 => 1.0 / 127.0,
            QuantKind::Q4_1 => 2.0 / 15.0,
        };
        let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, crate::backend::worst);
        assert!(err <= 0.5 * step * 1.01, "{kind:?}: max error {err}");
    }
}

/// Widened panels hold each weight as dequantizing its row gives it (up to the rounding of
/// `d q + m` in one FMA or two operations), on every kernel, in gemm's f32 panel layout.
#[test]
fn widened_panels_hold_the_dequantized_weights() {
    let (n, k) = (37, 96);
    let w = data(n * k, 3);
    for kind in QuantKind::ALL {
        let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quantize_row(kind, r)).collect();
        let q = QPanels::from_ggml(kind, &raw, n, k).unwrap();
        let mut deq = vec![0.0; n * k];
        for (r, o) in raw.chunks_exact(raw.len() / n).zip(deq.chunks_exact_mut(k)) {
            dequantize_row(kind, r, o);
        }
        for isa in Isa::available() {
            // Panels 1..3 (columns 16..48, the last ragged), weights 32..96.
            let (p, panels, k0, kc) = (1, 2, 32, 64);
            let mut out = vec![f32::NAN; panels * kc * NR];
            widen_panels(isa, &q, p, panels, k0, kc, &mut out);
            for j in 0..panels {
                for kk in 0..kc {
                    for c in 0..NR {
                        let col = (p + j) * NR + c;
                        let got = out[(j * kc + kk) * NR + c];
                        if col >= n {
                            assert_eq!(got, 0.0, "{isa:?} {kind:?} padding column {col}");
                            continue;
                        }
                        let want = deq[col * k + k0 + kk];
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{isa:?} {kind:?} ({col}, {}): {got} vs {want}",
                            k0 + kk
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn panels_give_back_every_row() {
    let (n, k) = (37, 64);
    for kind in QuantKind::ALL {
        let w = data(n * k, 2);
        let raw: Vec<u8> = w.chunks_exact(k).flat_map(|r| quantize_row(kind, r)).collect();
        let p = QPanels::from_ggml(kind, &raw, n, k).unwrap();
        let (mut want, mut got) = (vec![0.0; k], vec![0.0; k]);
        for i in 0..n {
            dequantize_row(kind, &raw[i * raw.len() / n..(i + 1) * raw.len() / n], &mut want);
            p.row(i, &mut got);
            assert_eq!(got, want, "{kind:?} row {i}");
        }
    }
}

#[test]
fn bad_shapes_are_refused_with_the_reason() {
    let err = QPanels::from_ggml(QuantKind::Q4_1, &[0; 20], 1, 48).err().unwrap();
    assert!(err.contains("whole blocks of 32"), "{err}");
    let err = QPanels::from_ggml(QuantKind::Q8_0, &[0; 10], 1, 32).err().unwrap();
    assert!(err.contains("expected 34"), "{err}");
    assert_eq!(QuantKind::parse("Q4_1"), Some(QuantKind::Q4_1));
    assert_eq!(QuantKind::parse("q4_k"), None);
}

#[test]
fn f16_widening_matches_half() {
    for bits in (0u16..=u16::MAX).step_by(7) {
        let h = f16::from_bits(bits);
        if h.is_finite() {
            assert_eq!(f16_to_f32(bits).to_bits(), h.to_f32().to_bits(), "{bits:#x}");
        }
    }
}
