//! CPU definitions of what the kernels compute, where the CPU runtime keeps its own private or
//! does not compute it in a form a kernel can be checked against: the RoPE table (the kernel
//! takes it precomputed), routing (the runtime's `Moe::route`), KLD and top-1 (its
//! `divergence` module). Each mirrors the runtime's code line for line; the unit tests below
//! check them against the runtime's public functions where there are some. RMSNorm, SwiGLU,
//! RoPE application, attention and log-sum-exp are checked directly against `fp8forge_runtime::ops`.

use crate::ops::SigmoidRouting;

/// Cos and sin tables for positions `0..len`, `len × inv_freq.len()` each, scaled by
/// `attention_factor`: what the runtime's `RopeTable::new` builds (default RoPE and YaRN differ
/// only in `inv_freq` and `attention_factor`).
pub fn rope_tables(inv_freq: &[f32], attention_factor: f32, len: usize) -> (Vec<f32>, Vec<f32>) {
    let mut cos = Vec::with_capacity(len * inv_freq.len());
    let mut sin = Vec::with_capacity(len * inv_freq.len());
    for p in 0..len {
        for &f in inv_freq {
            let a = p as f32 * f;
            cos.push(a.cos() * attention_factor);
            sin.push(a.sin() * attention_factor);
        }
    }
    (cos, sin)
}

/// Log-sum-exp of a row as the runtime computes it (`ops::log_sum_exp`): max in f32, sum in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    max + s.ln()
}

/// KL(P ‖ Q) of two rows of logits, P the baseline's: the runtime's `compare_position`.
pub fn kld(base: &[f32], model: &[f32]) -> f64 {
    let (zp, zq) = (log_sum_exp(base), log_sum_exp(model));
    let mut kl = 0f64;
    for (&x, &y) in base.iter().zip(model) {
        let lp = x as f64 - zp;
        let lq = y as f64 - zq;
        kl += lp.exp() * (lp - lq);
    }
    kl.max(0.0)
}

/// The index of the largest value; of equal values the lowest (None for an empty row).
pub fn top1(row: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in row.iter().enumerate() {
        if best.is_none_or(|b| x > row[b]) {
            best = Some(i);
        }
    }
    best
}

/// Indices of the `out.len()` largest values of `v`, largest first, ties to the lower index (the
/// runtime's `top_k`).
pub fn top_k(v: &[f32], out: &mut [usize]) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    out.copy_from_slice(&order[..out.len()]);
}

/// The sigmoid scores and the selection scores (score + bias, groups not kept at -inf) of one
/// token: what the runtime's `Router::SigmoidGroupLimited` selects from.
pub fn sigmoid_choice(l: &[f32], bias: &[f32], r: &SigmoidRouting) -> (Vec<f32>, Vec<f32>) {
    let scores: Vec<f32> = l.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let (g, per) = (r.groups, r.experts / r.groups.max(1));
    if g > 1 {
        let group_score: Vec<f32> = choice
            .chunks(per)
            .map(|c| {
                let mut two = [0usize; 2];
                top_k(c, &mut two);
                c[two[0]] + c[two[1]]
            })
            .collect();
        let mut keep = vec![0usize; r.topk_group];
        top_k(&group_score, &mut keep);
        for (gi, c) in choice.chunks_mut(per).enumerate() {
            if !keep.contains(&gi) {
                c.fill(f32::NEG_INFINITY);
            }
        }
    }
    (scores, choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_the_runtimes() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        assert_eq!(log_sum_exp(&row), fp8forge_runtime::ops::log_sum_exp(&row));
    }

    #[test]
    fn rope_tables_rotate_as_the_runtimes_rope_table() {
        let inv = [1.0f32, 0.3, 0.01];
        let (cos, sin) = rope_tables(&inv, 1.25, 8);
        for interleave in [false, true] {
            let table = fp8forge_runtime::ops::RopeTable::new(&inv, 1.25, interleave, 8);
            let x: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
            let mut want = x.clone();
            table.apply(&mut want, 5, &mut Vec::new());
            let (c, s) = (&cos[15..18], &sin[15..18]);
            let pair = |i: usize| if interleave { (x[2 * i], x[2 * i + 1]) } else { (x[i], x[3 + i]) };
            for i in 0..3 {
                let (a, b) = pair(i);
                assert_eq!(want[i], a * c[i] - b * s[i], "interleave {interleave}, dim {i}");
                assert_eq!(want[3 + i], b * c[i] + a * s[i], "interleave {interleave}, dim {}", 3 + i);
            }
        }
    }

    #[test]
    fn kld_of_a_row_with_itself_is_zero_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0, -1.0];
        let b = [1.5f32, 2.0, 2.0, -1.0];
        assert_eq!(kld(&a, &a), 0.0);
        let (za, zb) = (log_sum_exp(&a), log_sum_exp(&b));
        let want: f64 =
            a.iter().zip(&b).map(|(&x, &y)| (x as f64 - za).exp() * ((x as f64 - za) - (y as f64 - zb))).sum();
        assert_eq!(kld(&a, &b), want);
        assert!(want > 0.0);
    }

    #[test]
    fn top1_takes_the_first_of_equal_maxima() {
        assert_eq!(top1(&[0.5, 2.0, -1.0, 2.0]), Some(1));
        assert_eq!(top1(&[]), None);
    }
}
