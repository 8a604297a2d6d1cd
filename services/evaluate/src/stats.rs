//! The statistics behind `panscreen evaluate`: AUC with DeLong's confidence interval,
//! Wilson intervals for proportions, a cut-off at a target specificity, and predictive
//! values at a given prevalence.

/// z for a two-sided 95% interval.
const Z95: f64 = 1.959_963_984_540_054;

/// A proportion `k / n` with its Wilson score 95% interval; `None` when `n` is 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proportion {
    pub k: u64,
    pub n: u64,
    pub value: f64,
    pub ci: (f64, f64),
}

pub fn wilson(k: u64, n: u64) -> Option<Proportion> {
    if n == 0 {
        return None;
    }
    let (kf, nf) = (k as f64, n as f64);
    let p = kf / nf;
    let z2 = Z95 * Z95;
    let denominator = 1.0 + z2 / nf;
    let centre = (p + z2 / (2.0 * nf)) / denominator;
    let half = Z95 * (p * (1.0 - p) / nf + z2 / (4.0 * nf * nf)).sqrt() / denominator;
    Some(Proportion { k, n, value: p, ci: ((centre - half).max(0.0), (centre + half).min(1.0)) })
}

/// The area under the ROC curve (ties count half) with DeLong's 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Auc {
    pub value: f64,
    /// `None` with fewer than two studies in a class (no variance to estimate).
    pub ci: Option<(f64, f64)>,
    pub positives: u64,
    pub negatives: u64,
}

/// How many of `sorted` are below `x`, and how many equal it.
fn below_and_equal(sorted: &[f64], x: f64) -> (usize, usize) {
    let below = sorted.partition_point(|v| *v < x);
    let not_above = sorted.partition_point(|v| *v <= x);
    (below, not_above - below)
}

fn sample_variance(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() as f64 - 1.0)
}

/// DeLong, DeLong and Clarke-Pearson (1988), with the placement values computed by
/// sorting (O(n log n)); `None` when a class is empty.
pub fn auc(positive: &[f64], negative: &[f64]) -> Option<Auc> {
    if positive.is_empty() || negative.is_empty() {
        return None;
    }
    let mut negatives = negative.to_vec();
    negatives.sort_by(f64::total_cmp);
    let mut positives = positive.to_vec();
    positives.sort_by(f64::total_cmp);
    let (m, n) = (positives.len() as f64, negatives.len() as f64);
    // Each positive's share of negatives it outranks, and each negative's share of
    // positives that outrank it.
    let v10: Vec<f64> = positives
        .iter()
        .map(|x| {
            let (below, equal) = below_and_equal(&negatives, *x);
            (below as f64 + 0.5 * equal as f64) / n
        })
        .collect();
    let v01: Vec<f64> = negatives
        .iter()
        .map(|y| {
            let (below, equal) = below_and_equal(&positives, *y);
            let above = positives.len() - below - equal;
            (above as f64 + 0.5 * equal as f64) / m
        })
        .collect();
    let value = v10.iter().sum::<f64>() / m;
    let ci = (positives.len() >= 2 && negatives.len() >= 2).then(|| {
        let variance = sample_variance(&v10) / m + sample_variance(&v01) / n;
        let half = Z95 * variance.sqrt();
        ((value - half).max(0.0), (value + half).min(1.0))
    });
    Some(Auc { value, ci, positives: positive.len() as u64, negatives: negative.len() as u64 })
}

/// The cut `c` (flag a study when its score is above `c`) that keeps at least `target`
/// of `negative` unflagged with the most positives flagged: the ⌈target·n⌉-th smallest
/// negative score. `None` without negatives.
pub fn cut_at_specificity(negative: &[f64], target: f64) -> Option<f64> {
    if negative.is_empty() {
        return None;
    }
    let mut sorted = negative.to_vec();
    sorted.sort_by(f64::total_cmp);
    let keep = ((target * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[keep - 1])
}

/// Positive and negative predictive values of a test with `sensitivity` and
/// `specificity` where the condition has `prevalence` (Bayes' rule); each `None` where
/// it is undefined (nothing would be flagged, or nothing left unflagged).
pub fn predictive_values(
    sensitivity: f64,
    specificity: f64,
    prevalence: f64,
) -> (Option<f64>, Option<f64>) {
    let flagged = sensitivity * prevalence + (1.0 - specificity) * (1.0 - prevalence);
    let cleared = specificity * (1.0 - prevalence) + (1.0 - sensitivity) * prevalence;
    (
        (flagged > 0.0).then(|| sensitivity * prevalence / flagged),
        (cleared > 0.0).then(|| specificity * (1.0 - prevalence) / cleared),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-4
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998), table I: 81/263 → 0.2553–0.3662; 0/10 → 0–0.2775.
        let p = wilson(81, 263).unwrap();
        assert!(close(p.ci.0, 0.2553) && close(p.ci.1, 0.3662), "{p:?}");
        // 8/10: 0.4902–0.9433 (the worked example of the checks).
        let p = wilson(8, 10).unwrap();
        assert!(close(p.ci.0, 0.4902) && close(p.ci.1, 0.9433), "{p:?}");
        let p = wilson(0, 10).unwrap();
        assert!(close(p.ci.0, 0.0) && close(p.ci.1, 0.2775), "{p:?}");
        assert!(wilson(0, 0).is_none());
    }

    #[test]
    fn auc_counts_ties_half_and_matches_a_hand_worked_delong_interval() {
        assert_eq!(auc(&[0.9, 0.8], &[0.1, 0.2]).unwrap().value, 1.0);
        assert_eq!(auc(&[0.1], &[0.9]).unwrap().value, 0.0);
        assert_eq!(auc(&[0.5], &[0.5]).unwrap().value, 0.5);
        assert!(auc(&[], &[0.5]).is_none());
        // Positives 0.9, 0.6, 0.4; negatives 0.5, 0.3, 0.2, 0.1.
        // V10 = 1, 1, 0.75 (AUC 11/12); V01 = 2/3, 1, 1, 1.
        // S10 = 1/48, S01 = 1/36; var = 1/144 + 1/144 = 1/72; half = 1.96·0.11785.
        let result = auc(&[0.9, 0.6, 0.4], &[0.5, 0.3, 0.2, 0.1]).unwrap();
        assert!(close(result.value, 11.0 / 12.0));
        let (low, high) = result.ci.unwrap();
        assert!(close(low, 11.0 / 12.0 - Z95 * (1.0f64 / 72.0).sqrt()), "{low}");
        assert_eq!(high, 1.0);
        assert!(auc(&[0.9], &[0.5, 0.3]).unwrap().ci.is_none(), "one positive: no variance");
    }

    #[test]
    fn the_cut_keeps_the_target_share_of_negatives_unflagged() {
        let negatives: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        // 99 of 100 at or below the cut.
        assert_eq!(cut_at_specificity(&negatives, 0.99), Some(0.98));
        assert_eq!(cut_at_specificity(&negatives, 1.0), Some(0.99));
        assert_eq!(cut_at_specificity(&[], 0.99), None);
    }

    #[test]
    fn predictive_values_follow_bayes() {
        // PANDA's real-world figures at 1 in 1,000: most flags are false.
        let (ppv, npv) = predictive_values(0.929, 0.999, 0.001);
        assert!(close(ppv.unwrap(), 0.4819), "{ppv:?}");
        assert!(npv.unwrap() > 0.9999);
        assert_eq!(predictive_values(0.0, 1.0, 0.1).0, None, "nothing flagged");
    }
}
