//! The MoE routers: which experts each token goes to, and with what weight, from the router's
//! logits. Softmax top-k (Mixtral, Qwen3-MoE) and DeepSeek-V3's sigmoid scores with a selection
//! bias and group-limited top-k (`topk_method: noaux_tc`), computed as transformers computes them.

use rayon::prelude::*;

/// Softmax over all experts, then the `top_k` most probable; their probabilities are the weights,
/// renormalized to sum to 1 under `norm_topk_prob` (Mixtral always, Qwen3-MoE as configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoftmaxTopK {
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Renormalize the selected experts' probabilities.
    pub norm_topk_prob: bool,
}

/// DeepSeek-V3's routing parameters: sigmoid scores per expert; experts are chosen by score plus
/// `e_score_correction_bias`, among the `topk_group` groups (of `n_group`) whose two best biased
/// scores sum highest; their weights are the unbiased scores (renormalized under
/// `norm_topk_prob`) times `routed_scaling_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupLimited {
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Expert groups (1: no group limit).
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalize the selected experts' scores.
    pub norm_topk_prob: bool,
    /// Multiplier of the selected experts' weights.
    pub routed_scaling_factor: f32,
}

/// A router ready to route: its kind with what it needs beyond the logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Router {
    /// Softmax top-k.
    Softmax(SoftmaxTopK),
    /// Sigmoid, group-limited, with the selection bias (`experts` values).
    SigmoidGroupLimited(GroupLimited, Vec<f32>),
}

impl Router {
    /// Routed experts.
    pub fn experts(&self) -> usize {
        match self {
            Router::Softmax(r) => r.experts,
            Router::SigmoidGroupLimited(r, _) => r.experts,
        }
    }

    /// Experts selected per token.
    pub fn top_k(&self) -> usize {
        match self {
            Router::Softmax(r) => r.top_k,
            Router::SigmoidGroupLimited(r, _) => r.top_k,
        }
    }

    /// Selected experts and their weights for each of the `logits.len() / experts` tokens
    /// (`top_k` each), experts in the order of selection.
    pub fn select(&self, logits: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let (e, k) = (self.experts(), self.top_k());
        let t = logits.len() / e.max(1);
        let mut idx = vec![0usize; t * k];
        let mut wts = vec![0f32; t * k];
        idx.par_chunks_mut(k).zip(wts.par_chunks_mut(k)).zip(logits.par_chunks(e)).for_each(
            |((idx, wts), l)| match self {
                Router::Softmax(r) => softmax_top_k(r, l, idx, wts),
                Router::SigmoidGroupLimited(r, bias) => sigmoid_group_limited(r, bias, l, idx, wts),
            },
        );
        (idx, wts)
    }
}

/// One token of [`SoftmaxTopK`].
fn softmax_top_k(r: &SoftmaxTopK, l: &[f32], idx: &mut [usize], wts: &mut [f32]) {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let ex: Vec<f32> = l.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = ex.iter().sum();
    let probs: Vec<f32> = ex.iter().map(|v| v / sum).collect();
    top_k(&probs, idx);
    for (w, &i) in wts.iter_mut().zip(idx.iter()) {
        *w = probs[i];
    }
    if r.norm_topk_prob {
        let s: f32 = wts.iter().sum();
        wts.iter_mut().for_each(|w| *w /= s);
    }
}

/// One token of [`GroupLimited`] with the selection bias `bias`.
fn sigmoid_group_limited(r: &GroupLimited, bias: &[f32], l: &[f32], idx: &mut [usize], wts: &mut [f32]) {
    let scores: Vec<f32> = l.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
    let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let (g, per) = (r.n_group, r.experts / r.n_group.max(1));
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
    top_k(&choice, idx);
    for (w, &i) in wts.iter_mut().zip(idx.iter()) {
        *w = scores[i];
    }
    if r.norm_topk_prob {
        let s: f32 = wts.iter().sum::<f32>() + 1e-20;
        wts.iter_mut().for_each(|w| *w /= s);
    }
    wts.iter_mut().for_each(|w| *w *= r.routed_scaling_factor);
}

/// Indices of the `out.len()` largest values of `v`, largest first (ties: lower index first).
fn top_k(v: &[f32], out: &mut [usize]) {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    out.copy_from_slice(&order[..out.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(experts: usize, top_k: usize, norm_topk_prob: bool) -> Router {
        Router::Softmax(SoftmaxTopK { experts, top_k, norm_topk_prob })
    }

    fn sigmoid(n_group: usize, topk_group: usize, top_k: usize, bias: Vec<f32>) -> Router {
        let g = GroupLimited {
            experts: bias.len(),
            top_k,
            n_group,
            topk_group,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        };
        Router::SigmoidGroupLimited(g, bias)
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn top_k_takes_largest_first_and_breaks_ties_by_index() {
        let mut o = [0usize; 3];
        top_k(&[0.1, 0.5, 0.5, -1.0, 0.7], &mut o);
        assert_eq!(o, [4, 1, 2]);
    }

    #[test]
    fn softmax_top_k_weights_are_the_softmax_probabilities_of_the_chosen_experts() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let z: f32 = logits.iter().map(|v| (v - 3.0).exp()).sum();
        let p = |i: usize| (logits[i] - 3.0).exp() / z;
        let (idx, wts) = softmax(4, 2, false).select(&logits);
        assert_eq!(idx, [1, 2], "experts chosen by probability, most probable first");
        assert!(close(wts[0], p(1)) && close(wts[1], p(2)), "weights {wts:?} are not the probabilities");
        assert!(wts.iter().sum::<f32>() < 1.0, "without norm_topk_prob the weights keep the others' mass");
    }

    #[test]
    fn softmax_top_k_with_norm_topk_prob_sums_to_one_in_the_same_ratio() {
        let logits = [1.0f32, 3.0, 2.0, 0.0, /* second token */ 0.5, 0.5, -2.0, 4.0];
        let (raw_i, raw) = softmax(4, 2, false).select(&logits);
        let (idx, wts) = softmax(4, 2, true).select(&logits);
        assert_eq!(idx, raw_i, "renormalizing does not change the choice");
        assert_eq!(idx, [1, 2, 3, 0], "second token: a tie between experts 0 and 1 goes to the lower index");
        for tok in 0..2 {
            let w = &wts[tok * 2..tok * 2 + 2];
            assert!(close(w[0] + w[1], 1.0), "token {tok}: weights {w:?} do not sum to 1");
            assert!(close(w[0] / w[1], raw[tok * 2] / raw[tok * 2 + 1]), "token {tok}: ratio changed");
        }
    }

    #[test]
    fn sigmoid_routing_chooses_by_biased_score_and_weighs_by_unbiased_score() {
        // Expert 0 has the best logit, but the bias prefers experts 2 and 3.
        let logits = [2.0f32, 1.0, 0.0, -1.0];
        let (idx, wts) = sigmoid(1, 1, 2, vec![0.0, 0.0, 1.0, 1.0]).select(&logits);
        assert_eq!(idx, [2, 3], "the selection bias decides the choice");
        let s = |v: f32| 1.0 / (1.0 + (-v).exp());
        let sum = s(0.0) + s(-1.0);
        assert!(close(wts[0], s(0.0) / sum * 2.5) && close(wts[1], s(-1.0) / sum * 2.5), "weights {wts:?}");
    }

    #[test]
    fn group_limited_routing_only_chooses_within_the_best_groups() {
        // Four groups of two. Group 0 holds the single best expert, but group 2's two experts
        // together score higher; with one group kept, both experts come from group 2.
        let logits = [5.0f32, -5.0, -2.0, -2.0, 3.0, 3.0, -1.0, -1.0];
        let (idx, _) = sigmoid(4, 1, 2, vec![0.0; 8]).select(&logits);
        assert_eq!(idx, [4, 5], "experts outside the kept group were chosen");
        // Two groups kept: groups 2 and 0; the best two experts among them.
        let (idx, _) = sigmoid(4, 2, 2, vec![0.0; 8]).select(&logits);
        assert_eq!(idx, [0, 4], "the best expert of the kept groups");
        // No group limit: the same as two groups here, and expert 0 first.
        let (idx, _) = sigmoid(1, 1, 3, vec![0.0; 8]).select(&logits);
        assert_eq!(idx, [0, 4, 5]);
    }
}
