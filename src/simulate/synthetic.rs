//! LEAF's Synthetic(α, β) data (Caldas et al., "LEAF: A Benchmark for Federated Settings";
//! Li et al., FedProx, after Shamir et al.): every participant gets its own data, generated
//! for it, so a simulation can have more participants than any real dataset has rows (the
//! 100,000-device studies of cross-device FL).
//!
//! Participant k draws u_k ~ N(0, α²) and B_k ~ N(0, β²) (α and β are standard deviations,
//! as in LEAF's generator); its model W_k (10 × 60) and b_k (10) ~ N(u_k, 1); its feature
//! mean v_k with v_kj ~ N(B_k, 1); its rows x ~ N(v_k, Σ) with Σ diagonal, Σ_jj = j^−1.2
//! (a variance); each label is argmax(W_k x + b_k). α sets how much the
//! participants' models differ, β how much their features do: (0, 0) is nearly iid, (1, 1)
//! strongly skewed. Row counts are lognormal, as in LEAF, but smaller so that 100,000
//! participants fit in memory: 5 + ⌊e^N(ln 12, 1)⌋, at most 500 (median 17, mean ~25).
//! Everything is drawn from the seed and the participant's index alone, so a worker process
//! generates exactly its shard.

use anyhow::bail;
use cohort_model::{Dataset, FeatureShape};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

pub(super) const FEATURES: usize = 60;
pub(super) const CLASSES: usize = 10;

/// Synthetic(α, β) for a seed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Synthetic {
    alpha: f64,
    beta: f64,
    seed: u64,
}

fn normal(mean: f64, sd: f64) -> Normal<f64> {
    Normal::new(mean, sd).expect("a finite mean and a standard deviation ≥ 0")
}

impl Synthetic {
    /// From `ALPHA,BETA` (`--dataset synthetic:ALPHA,BETA`).
    pub(super) fn parse(spec: &str, seed: u64) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "synthetic data is `synthetic:ALPHA,BETA` with ALPHA and BETA standard deviations ≥ 0 \
                 (e.g. synthetic:1,1), not synthetic:{spec}"
            )
        };
        let (a, b) = spec.split_once(',').ok_or_else(bad)?;
        let (alpha, beta): (f64, f64) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if !(alpha.is_finite() && beta.is_finite() && alpha >= 0.0 && beta >= 0.0) {
            return Err(bad());
        }
        Ok(Synthetic { alpha, beta, seed })
    }

    /// Participant `i`'s training and held-out rows (the last `test_fraction` of its rows,
    /// at least one).
    pub(super) fn participant(
        &self,
        i: usize,
        test_fraction: f64,
    ) -> anyhow::Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&test_fraction) || test_fraction == 0.0 {
            bail!(
                "--test-fraction must be above 0 and below 1 for synthetic data, not {test_fraction}"
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i as u64)
                .rotate_left(17)
                ^ 0x5eed_1eaf,
        );
        let rows = (5.0 + normal(12f64.ln(), 1.0).sample(&mut rng).exp()).min(500.0) as usize;
        let u = normal(0.0, self.alpha).sample(&mut rng);
        let b_k = normal(0.0, self.beta).sample(&mut rng);
        let model = normal(u, 1.0);
        let w: Vec<f64> = (0..CLASSES * FEATURES)
            .map(|_| model.sample(&mut rng))
            .collect();
        let bias: Vec<f64> = (0..CLASSES).map(|_| model.sample(&mut rng)).collect();
        let v: Vec<f64> = (0..FEATURES)
            .map(|_| normal(b_k, 1.0).sample(&mut rng))
            .collect();
        let sd: Vec<f64> = (1..=FEATURES)
            .map(|j| (j as f64).powf(-1.2).sqrt())
            .collect();
        let unit = normal(0.0, 1.0);
        let mut features = Vec::with_capacity(rows * FEATURES);
        let mut labels = Vec::with_capacity(rows);
        for _ in 0..rows {
            let x: Vec<f64> = (0..FEATURES)
                .map(|j| v[j] + sd[j] * unit.sample(&mut rng))
                .collect();
            let logit = |c: usize| -> f64 {
                bias[c]
                    + w[c * FEATURES..(c + 1) * FEATURES]
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| a * b)
                        .sum::<f64>()
            };
            let label = (0..CLASSES)
                .max_by(|&a, &b| logit(a).total_cmp(&logit(b)))
                .expect("classes");
            features.extend(x.iter().map(|&f| f as f32));
            labels.push(label as u32);
        }
        let test = ((rows as f64 * test_fraction).round() as usize).clamp(1, rows - 2);
        let split = (rows - test) * FEATURES;
        let train = Dataset::new(
            features[..split].to_vec(),
            labels[..rows - test].to_vec(),
            FeatureShape::Flat(FEATURES),
            CLASSES,
        )?;
        let held_out = Dataset::new(
            features[split..].to_vec(),
            labels[rows - test..].to_vec(),
            FeatureShape::Flat(FEATURES),
            CLASSES,
        )?;
        Ok((train, held_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_participant_is_generated_from_the_seed_and_its_index_alone() {
        let s = Synthetic::parse("1,1", 7).unwrap();
        let (a, _) = s.participant(41, 0.2).unwrap();
        let (b, _) = s.participant(41, 0.2).unwrap();
        assert_eq!(a.features, b.features);
        assert_ne!(a.features, s.participant(42, 0.2).unwrap().0.features);
        let other = Synthetic::parse("1,1", 8).unwrap();
        assert_ne!(a.features, other.participant(41, 0.2).unwrap().0.features);
    }

    #[test]
    fn sizes_and_skew_are_as_documented() {
        let s = Synthetic::parse("1,1", 1).unwrap();
        let mut sizes = Vec::new();
        let mut majority = Vec::new();
        for i in 0..2000 {
            let (tr, te) = s.participant(i, 0.2).unwrap();
            assert!(!te.is_empty() && tr.len() >= 2);
            assert_eq!(tr.shape.len(), FEATURES);
            sizes.push(tr.len() + te.len());
            let mut counts = [0usize; CLASSES];
            for &l in &tr.labels {
                counts[l as usize] += 1;
            }
            majority.push(*counts.iter().max().unwrap() as f64 / tr.len() as f64);
        }
        sizes.sort();
        let (median, mean) = (
            sizes[sizes.len() / 2],
            sizes.iter().sum::<usize>() as f64 / sizes.len() as f64,
        );
        assert!((14..=20).contains(&median), "median {median}");
        assert!((20.0..32.0).contains(&mean), "mean {mean}");
        assert!(*sizes.first().unwrap() >= 5 && *sizes.last().unwrap() <= 500);
        // Skewed: a participant's most frequent class holds far more than a tenth of its rows.
        let skew = majority.iter().sum::<f64>() / majority.len() as f64;
        assert!(skew > 0.4, "mean majority share {skew}");
    }

    #[test]
    fn bad_specifications_say_what_is_expected() {
        for bad in ["1", "a,1", "-1,1", "1,inf"] {
            let e = Synthetic::parse(bad, 1).unwrap_err().to_string();
            assert!(e.contains("synthetic:ALPHA,BETA"), "{bad}: {e}");
        }
    }
}
