//! Keep-mask selection (spec §4.2–4.3): drop the `k` rows with the smallest significance and keep
//! the rest in their original order.
//!
//! Tie rule (deterministic, unlike PyTorch's `topk`): rows are ranked by (score, index) with
//! `f32::total_cmp`, so among equal scores the lower index is dropped first. A NaN score (of
//! either sign) counts as −∞: the least significant, dropped first; affix rows carry +∞ and are
//! never dropped while `k` ≤ the number of context rows (the plan guarantees it).

/// Indices (ascending) of the rows kept after dropping the `k` smallest of `scores`.
pub fn keep_after_dropping(scores: &[f32], k: usize) -> Vec<usize> {
    let n = scores.len();
    if k == 0 {
        return (0..n).collect();
    }
    let k = k.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    // Partial selection would do; n is a few thousand, a full stable sort is simple and exact.
    let key = |i: usize| {
        if scores[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            scores[i]
        }
    };
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(a.cmp(&b)));
    let mut drop = vec![false; n];
    for &i in &order[..k] {
        drop[i] = true;
    }
    (0..n).filter(|&i| !drop[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t6_tie_break_drops_lower_index() {
        // spec §14 T6: sig = [+inf, 1.5, 2.0, 2.5, 2.0, +inf], k = 2 → keep [0, 3, 4, 5].
        let inf = f32::INFINITY;
        let sig = [inf, 1.5, 2.0, 2.5, 2.0, inf];
        assert_eq!(keep_after_dropping(&sig, 2), vec![0, 3, 4, 5]);
        // Uncalibrated: raw [9, 1.5, 2.0, 2.5, 3.0, 7] with affixes at +inf drops {1, 2}.
        let raw = [inf, 1.5, 2.0, 2.5, 3.0, inf];
        assert_eq!(keep_after_dropping(&raw, 2), vec![0, 3, 4, 5]);
    }

    #[test]
    fn order_is_kept_and_extremes() {
        let s = [5.0, -1.0, 3.0, 0.0, 9.0];
        assert_eq!(keep_after_dropping(&s, 0), vec![0, 1, 2, 3, 4]);
        assert_eq!(keep_after_dropping(&s, 2), vec![0, 2, 4]);
        assert_eq!(keep_after_dropping(&s, 5), Vec::<usize>::new());
        // NaN of either sign is the least significant: dropped before -∞'s later peers.
        assert_eq!(keep_after_dropping(&[1.0, f32::NAN, 2.0], 1), vec![0, 2]);
        assert_eq!(keep_after_dropping(&[1.0, -f32::NAN, 2.0], 1), vec![0, 2]);
        assert_eq!(
            keep_after_dropping(&[f32::INFINITY, f32::NAN, f32::NEG_INFINITY, 0.0], 2),
            vec![0, 3]
        );
        assert_eq!(
            keep_after_dropping(&[f32::INFINITY, f32::NEG_INFINITY], 1),
            vec![0]
        );
    }
}
