//! What a step costs: the features both the simulator's cost model and SmartSpec's step-time
//! model are written in, and the small least-squares solver both fit with. A leaf: it knows no
//! request, plan or scheduler.

/// What a step computes, in the terms of the simulator's cost model (fitted to measured step
/// times of the real engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepFeatures {
    /// Tokens computed this step (prefill chunks + one per decoding sequence).
    pub num_tokens: f64,
    pub num_seqs: f64,
    /// Sum over sequences of the context length read by attention (KV traffic).
    pub context_tokens: f64,
    /// Sum over new tokens of the positions each attends to (attention arithmetic).
    pub attention_pairs: f64,
}

/// Gaussian elimination with partial pivoting (`n x n`); `None` when singular. Used by the
/// simulator's fitted cost model and by SmartSpec's online step-time model.
pub fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let k = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (x, p) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *x -= k * p;
            }
            b[row] -= k * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|c| a[row][c] * x[c]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Some(x)
}
