//! Robust aggregation rules: the server combines the individual updates so that a few
//! outlying or malicious ones cannot drag the model (plaintext jobs only: secure aggregation
//! never shows the server an individual update, and these rules need every one).
//!
//! - `median`: the coordinate-wise median (Yin et al., "Byzantine-Robust Distributed
//!   Learning: Towards Optimal Statistical Rates", 2018).
//! - `trimmed-mean`: per coordinate, the mean after dropping the largest and the smallest
//!   ⌊β n⌋ values, β = 0.2 (the same paper; Flower's FedTrimmedAvg default).
//! - `krum` and `multi-krum` (Blanchard et al., "Machine Learning with Adversaries:
//!   Byzantine Tolerant Gradient Descent", 2017): each update is scored by the sum of its
//!   squared distances to its n − f − 2 nearest others, with f = ⌊(n − 3)/2⌋, the most
//!   Byzantine updates Krum tolerates; `krum` takes the best-scored update, `multi-krum` the
//!   mean of the n − f best.
//!
//! Every update weighs the same: a weight is what an attacker would inflate. The rules are
//! pure functions; `strategy::Robust` makes one a job's strategy.

/// Which robust rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RobustRule {
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
}

/// The share of each end `trimmed-mean` drops.
pub const TRIM: f64 = 0.2;

impl RobustRule {
    pub fn by_name(name: &str) -> Option<RobustRule> {
        match name {
            "median" => Some(RobustRule::Median),
            "trimmed-mean" => Some(RobustRule::TrimmedMean),
            "krum" => Some(RobustRule::Krum),
            "multi-krum" => Some(RobustRule::MultiKrum),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RobustRule::Median => "median",
            RobustRule::TrimmedMean => "trimmed-mean",
            RobustRule::Krum => "krum",
            RobustRule::MultiKrum => "multi-krum",
        }
    }

    /// The combined update of `updates` (at least one, all of one length).
    pub fn combine(self, updates: &[Vec<f32>]) -> Vec<f32> {
        match self {
            RobustRule::Median => per_coordinate(updates, |col| {
                let n = col.len();
                if n % 2 == 1 {
                    col[n / 2]
                } else {
                    ((col[n / 2 - 1] as f64 + col[n / 2] as f64) / 2.0) as f32
                }
            }),
            RobustRule::TrimmedMean => per_coordinate(updates, |col| {
                let k = (TRIM * col.len() as f64).floor() as usize;
                let kept = &col[k..col.len() - k];
                (kept.iter().map(|&x| x as f64).sum::<f64>() / kept.len() as f64) as f32
            }),
            RobustRule::Krum => updates[krum_order(updates)[0]].clone(),
            RobustRule::MultiKrum => {
                let n = updates.len();
                let keep = n - byzantine(n);
                let order = krum_order(updates);
                let chosen: Vec<&Vec<f32>> = order[..keep].iter().map(|&i| &updates[i]).collect();
                (0..updates[0].len())
                    .map(|j| (chosen.iter().map(|u| u[j] as f64).sum::<f64>() / keep as f64) as f32)
                    .collect()
            }
        }
    }
}

/// Krum's f for n updates: ⌊(n − 3)/2⌋ (0 below 3).
pub fn byzantine(n: usize) -> usize {
    n.saturating_sub(3) / 2
}

/// `f` of each coordinate's values, sorted.
fn per_coordinate(updates: &[Vec<f32>], f: impl Fn(&[f32]) -> f32) -> Vec<f32> {
    let mut col = vec![0.0f32; updates.len()];
    (0..updates[0].len())
        .map(|j| {
            for (c, u) in col.iter_mut().zip(updates) {
                *c = u[j];
            }
            col.sort_by(f32::total_cmp);
            f(&col)
        })
        .collect()
}

/// Indices of `updates` from the best Krum score to the worst (ties by index).
fn krum_order(updates: &[Vec<f32>]) -> Vec<usize> {
    let n = updates.len();
    let neighbours = n.saturating_sub(byzantine(n) + 2).max(1).min(n - 1);
    let dist = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum()
    };
    let mut d = vec![vec![0.0f64; n]; n];
    for i in 0..n {
        for j in i + 1..n {
            let x = dist(&updates[i], &updates[j]);
            (d[i][j], d[j][i]) = (x, x);
        }
    }
    let score: Vec<f64> = (0..n)
        .map(|i| {
            let mut others: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d[i][j]).collect();
            others.sort_by(f64::total_cmp);
            others.iter().take(neighbours).sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| score[a].total_cmp(&score[b]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four honest updates near 0.1 and one attacker at 100.
    fn attacked() -> Vec<Vec<f32>> {
        vec![
            vec![0.10, -0.20],
            vec![0.12, -0.18],
            vec![0.08, -0.22],
            vec![0.11, -0.21],
            vec![100.0, 100.0],
        ]
    }

    #[test]
    fn each_rule_ignores_the_outlier_by_its_definition() {
        let u = attacked();
        assert_eq!(RobustRule::Median.combine(&u), vec![0.11, -0.20]);
        // β = 0.2 of 5 drops one value at each end: the middle three.
        let t = RobustRule::TrimmedMean.combine(&u);
        let want = [(0.10 + 0.11 + 0.12) / 3.0, (-0.21 - 0.20 - 0.18) / 3.0];
        for (g, w) in t.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{t:?}");
        }
        // n = 5: f = 1, each scored by its 2 nearest others. The attacker is never chosen.
        assert_eq!(byzantine(5), 1);
        let k = RobustRule::Krum.combine(&u);
        assert!(u[..4].contains(&k), "{k:?}");
        // By hand, the sums of squared distances to the two nearest others: update 0 has
        // 0.0002 + 0.0008, update 3 0.0002 + 0.0010, updates 1 and 2 0.0018 each.
        assert_eq!(k, vec![0.10, -0.20]);
        // Multi-Krum averages the n − f = 4 best: the honest ones.
        let m = RobustRule::MultiKrum.combine(&u);
        let want = [0.1025, -0.2025];
        for (g, w) in m.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{m:?}");
        }
        // An even count: the median averages the middle two.
        let m = RobustRule::Median.combine(&u[..4]);
        assert!(
            (m[0] - 0.105).abs() < 1e-6 && (m[1] + 0.205).abs() < 1e-6,
            "{m:?}"
        );
        // One update: every rule returns it.
        for r in ["median", "trimmed-mean", "krum", "multi-krum"] {
            let r = RobustRule::by_name(r).unwrap();
            assert_eq!(r.combine(&u[..1]), u[0], "{}", r.name());
        }
    }
}
