//! Seeded partitioners that split one dataset among simulated participants.

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

use crate::DataError;

/// How examples are spread over participants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Partition {
    /// Shuffled, equal shares.
    Iid,
    /// Example `i` goes to participant `i mod n`, unshuffled: a split any other tool can
    /// reproduce exactly (for side-by-side comparisons).
    RoundRobin,
    /// For each class, shares drawn from Dirichlet(α): small α, more skew by label.
    Dirichlet { alpha: f64 },
    /// Sorted by label and cut into `k` shards per participant (McMahan et al.'s pathological split).
    Shards { per_participant: usize },
}

impl std::str::FromStr for Partition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "iid" if arg.is_empty() => Ok(Partition::Iid),
            "roundrobin" if arg.is_empty() => Ok(Partition::RoundRobin),
            "dirichlet" => {
                let alpha: f64 = arg.parse().map_err(|_| {
                    format!("partition {s:?}: expected dirichlet:ALPHA with ALPHA a number, e.g. dirichlet:0.5")
                })?;
                if !(alpha > 0.0 && alpha.is_finite()) {
                    return Err(format!("partition {s:?}: ALPHA must be positive"));
                }
                Ok(Partition::Dirichlet { alpha })
            }
            "shards" => {
                let k: usize = arg.parse().ok().filter(|&k| k > 0).ok_or_else(|| {
                    format!("partition {s:?}: expected shards:K with K a positive integer")
                })?;
                Ok(Partition::Shards { per_participant: k })
            }
            _ => Err(format!(
                "unknown partition {s:?}: use iid, roundrobin, dirichlet:ALPHA or shards:K"
            )),
        }
    }
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partition::Iid => write!(f, "iid"),
            Partition::RoundRobin => write!(f, "roundrobin"),
            Partition::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Partition::Shards { per_participant } => write!(f, "shards:{per_participant}"),
        }
    }
}

/// The smallest share a Dirichlet draw may give a participant before it is drawn again.
const MIN_SHARE: usize = 2;

/// Splits example indices `0..labels.len()` into `parts` disjoint sets covering all of them.
/// The same labels, scheme and seed always give the same split.
pub fn partition(
    labels: &[u32],
    num_classes: usize,
    parts: usize,
    scheme: Partition,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    if parts == 0 {
        return Err(DataError::Invalid(
            "cannot partition among 0 participants".into(),
        ));
    }
    if labels.len() < parts * MIN_SHARE {
        return Err(DataError::Invalid(format!(
            "{} examples are too few for {parts} participants (at least {MIN_SHARE} each)",
            labels.len()
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![Vec::new(); parts];
    match scheme {
        Partition::Iid => {
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.shuffle(&mut rng);
            for (k, i) in idx.into_iter().enumerate() {
                out[k % parts].push(i);
            }
        }
        Partition::RoundRobin => {
            for i in 0..labels.len() {
                out[i % parts].push(i);
            }
        }
        Partition::Dirichlet { alpha } => {
            let gamma = Gamma::new(alpha, 1.0)
                .map_err(|e| DataError::Invalid(format!("dirichlet alpha {alpha}: {e}")))?;
            let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
            for (i, &l) in labels.iter().enumerate() {
                by_class[l as usize].push(i);
            }
            // Redraw until every participant holds a few examples (as the usual reference
            // implementations do); give up after many tries rather than loop forever.
            for attempt in 0.. {
                for o in out.iter_mut() {
                    o.clear();
                }
                for idx in &by_class {
                    let mut idx = idx.clone();
                    idx.shuffle(&mut rng);
                    let w: Vec<f64> = (0..parts).map(|_| gamma.sample(&mut rng)).collect();
                    let total: f64 = w.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                    let mut start = 0usize;
                    let mut acc = 0.0;
                    for (p, wp) in w.iter().enumerate() {
                        acc += wp / total;
                        let end = if p + 1 == parts {
                            idx.len()
                        } else {
                            ((acc * idx.len() as f64).round() as usize).clamp(start, idx.len())
                        };
                        out[p].extend_from_slice(&idx[start..end]);
                        start = end;
                    }
                }
                if out.iter().all(|o| o.len() >= MIN_SHARE) {
                    break;
                }
                if attempt == 1000 {
                    return Err(DataError::Invalid(format!(
                        "dirichlet:{alpha} left a participant with fewer than {MIN_SHARE} examples \
                         in 1000 draws; use a larger alpha or fewer participants"
                    )));
                }
            }
            for o in out.iter_mut() {
                o.shuffle(&mut rng);
            }
        }
        Partition::Shards { per_participant } => {
            let n_shards = parts * per_participant;
            if labels.len() < n_shards {
                return Err(DataError::Invalid(format!(
                    "{} examples are too few for {n_shards} shards",
                    labels.len()
                )));
            }
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.shuffle(&mut rng);
            idx.sort_by_key(|&i| labels[i]);
            let mut shard_ids: Vec<usize> = (0..n_shards).collect();
            shard_ids.shuffle(&mut rng);
            let size = labels.len() / n_shards;
            for (k, s) in shard_ids.into_iter().enumerate() {
                let end = if s + 1 == n_shards {
                    labels.len()
                } else {
                    (s + 1) * size
                };
                out[k % parts].extend_from_slice(&idx[s * size..end]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, k: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i % k).collect()
    }

    fn check_cover(parts: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(
            all,
            (0..n).collect::<Vec<_>>(),
            "parts must cover each index once"
        );
    }

    #[test]
    fn parse() {
        assert_eq!("iid".parse(), Ok(Partition::Iid));
        assert_eq!("roundrobin".parse(), Ok(Partition::RoundRobin));
        assert_eq!(
            "dirichlet:0.5".parse(),
            Ok(Partition::Dirichlet { alpha: 0.5 })
        );
        assert_eq!(
            "shards:2".parse(),
            Ok(Partition::Shards { per_participant: 2 })
        );
        assert!("dirichlet:-1".parse::<Partition>().is_err());
        assert!("dirichlet".parse::<Partition>().is_err());
        assert!("random".parse::<Partition>().unwrap_err().contains("iid"));
    }

    #[test]
    fn iid_is_balanced_and_seeded() {
        let l = labels(1000, 10);
        let p = partition(&l, 10, 3, Partition::Iid, 1).unwrap();
        check_cover(&p, 1000);
        assert!(p.iter().all(|x| x.len() == 333 || x.len() == 334));
        assert_eq!(p, partition(&l, 10, 3, Partition::Iid, 1).unwrap());
        assert_ne!(p, partition(&l, 10, 3, Partition::Iid, 2).unwrap());
    }

    #[test]
    fn dirichlet_skews_labels() {
        let l = labels(6000, 10);
        let p = partition(&l, 10, 10, Partition::Dirichlet { alpha: 0.1 }, 3).unwrap();
        check_cover(&p, 6000);
        // With alpha = 0.1 most participants are dominated by one or two classes.
        let dominated = p
            .iter()
            .filter(|part| {
                let mut c = [0usize; 10];
                part.iter().for_each(|&i| c[l[i] as usize] += 1);
                *c.iter().max().unwrap() * 2 > part.len()
            })
            .count();
        assert!(dominated >= 5, "only {dominated} skewed participants");
        let iidish = partition(&l, 10, 10, Partition::Dirichlet { alpha: 1000.0 }, 3).unwrap();
        assert!(
            iidish
                .iter()
                .all(|part| part.len() > 500 && part.len() < 700)
        );
    }

    #[test]
    fn shards_give_few_labels_each() {
        let l = labels(1000, 10);
        let p = partition(&l, 10, 5, Partition::Shards { per_participant: 2 }, 4).unwrap();
        check_cover(&p, 1000);
        for part in &p {
            let mut seen: Vec<u32> = part.iter().map(|&i| l[i]).collect();
            seen.sort();
            seen.dedup();
            assert!(seen.len() <= 2, "{seen:?}");
        }
    }

    #[test]
    fn roundrobin_is_i_mod_n() {
        let p = partition(&labels(7, 2), 2, 3, Partition::RoundRobin, 99).unwrap();
        assert_eq!(p, vec![vec![0, 3, 6], vec![1, 4], vec![2, 5]]);
    }

    #[test]
    fn too_few_examples_is_an_error() {
        let e = partition(&labels(5, 2), 2, 3, Partition::Iid, 0).unwrap_err();
        assert!(e.to_string().contains("too few"));
    }
}
