//! Replicated (CNF) t-of-n secret sharing over Z/2^64, which works where Shamir's does not
//! (Z/2^64 is not a field).
//!
//! For every set M of t − 1 committee members there is a piece r_M; the pieces add up to the
//! secret. Piece r_M goes to every member *not* in M. Any t members together hold every piece
//! (no set of t − 1 contains all of them); any t − 1 members miss the piece of their own set.

use rand::rngs::ChaCha20Rng;
use rand::{Rng, SeedableRng};

use crate::CryptoError;

/// A committee of `n` members of which any `t` can decrypt; `t` must be a strict majority so
/// that two different sets of `t` members always share a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committee {
    n: usize,
    t: usize,
    /// The (t − 1)-subsets, in lexicographic order: piece k belongs to `sets[k]`'s complement.
    sets: Vec<Vec<usize>>,
}

fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut cur = Vec::with_capacity(k);
    fn go(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            go(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    go(0, n, k, &mut cur, &mut out);
    out
}

impl Committee {
    /// `n` members, threshold `t` with `n / 2 < t ≤ n`; at most 12 members (C(12, 6) = 924
    /// pieces).
    pub fn new(n: usize, t: usize) -> Result<Self, CryptoError> {
        if n == 0 || n > 12 {
            return Err(CryptoError::Committee(format!(
                "committee size must be 1..=12, not {n}"
            )));
        }
        if t > n || 2 * t <= n {
            return Err(CryptoError::Committee(format!(
                "threshold {t} of {n} is not a strict majority (need {} ≤ t ≤ {n})",
                n / 2 + 1
            )));
        }
        Ok(Committee {
            n,
            t,
            sets: subsets(n, t - 1),
        })
    }

    /// The design's default: n = min(5, available), t = ⌊n/2⌋ + 1.
    pub fn default_for(available: usize) -> Result<Self, CryptoError> {
        let n = available.clamp(1, 5);
        Committee::new(n, n / 2 + 1)
    }

    pub fn size(&self) -> usize {
        self.n
    }

    pub fn threshold(&self) -> usize {
        self.t
    }

    /// Number of pieces, C(n, t − 1).
    pub fn pieces(&self) -> usize {
        self.sets.len()
    }

    /// Whether `member` holds piece `k`.
    pub fn holds(&self, member: usize, k: usize) -> bool {
        member < self.n && !self.sets[k].contains(&member)
    }

    /// Indices of the pieces `member` holds.
    pub fn pieces_of(&self, member: usize) -> Vec<usize> {
        (0..self.pieces())
            .filter(|&k| self.holds(member, k))
            .collect()
    }

    /// Splits `secret` into pieces (uniform, adding up to the secret, wrapping), expanded.
    pub fn share(&self, secret: &[u64], rng: &mut impl Rng) -> Vec<Vec<u64>> {
        self.share_compact(secret, rng)
            .iter()
            .map(|p| p.expand(secret.len()))
            .collect()
    }

    /// Splits `secret` into pieces as they travel: every piece but the last is the 32-byte
    /// seed of a ChaCha20 stream (uniform in Z/2^64 per value); the last is the full vector
    /// `secret − Σ others`. A member holding C(n − 1, t − 1) pieces receives mostly seeds.
    pub fn share_compact(&self, secret: &[u64], rng: &mut impl Rng) -> Vec<Piece> {
        let mut pieces = Vec::with_capacity(self.pieces());
        let mut last = secret.to_vec();
        for _ in 1..self.pieces() {
            let p = Piece::Seed(std::array::from_fn(|_| rng.next_u64()));
            for (l, v) in last.iter_mut().zip(p.expand(secret.len())) {
                *l = l.wrapping_sub(v);
            }
            pieces.push(p);
        }
        pieces.push(Piece::Full(last));
        pieces
    }

    /// Assigns every piece to exactly one of the `responders` that holds it (the first in
    /// the given order). Fails when fewer than `t` distinct members responded and some piece
    /// has no holder among them.
    pub fn assign(&self, responders: &[usize]) -> Result<Vec<(usize, usize)>, CryptoError> {
        let all: Vec<usize> = (0..self.pieces()).collect();
        self.assign_pieces(&all, responders)
    }

    /// Assigns each of `pieces` to one of the `responders` that holds it, preferring the
    /// responder with the fewest pieces so far (so work spreads across the committee).
    pub fn assign_pieces(
        &self,
        pieces: &[usize],
        responders: &[usize],
    ) -> Result<Vec<(usize, usize)>, CryptoError> {
        let mut load = vec![0usize; self.n];
        let mut out = Vec::with_capacity(pieces.len());
        for &k in pieces {
            let m = responders
                .iter()
                .copied()
                .filter(|&m| k < self.pieces() && self.holds(m, k))
                .min_by_key(|&m| load[m])
                .ok_or_else(|| {
                    CryptoError::Committee(format!(
                        "no responding member holds piece {k}: {} responded, {} needed",
                        responders.len(),
                        self.t
                    ))
                })?;
            load[m] += 1;
            out.push((k, m));
        }
        Ok(out)
    }
}

/// One piece of a replicated sharing as it is sealed and sent.
#[derive(Clone, PartialEq, Eq)]
pub enum Piece {
    /// A ChaCha20 seed that expands to a uniform vector.
    Seed([u64; 4]),
    /// The correcting piece, in full.
    Full(Vec<u64>),
}

impl std::fmt::Debug for Piece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Piece::Seed(_) => f.write_str("Piece::Seed(..)"),
            Piece::Full(v) => write!(f, "Piece::Full({} values)", v.len()),
        }
    }
}

impl Piece {
    /// The values of the piece, `len` of them.
    pub fn expand(&self, len: usize) -> Vec<u64> {
        match self {
            Piece::Seed(words) => {
                let mut seed = [0u8; 32];
                for (c, w) in seed.chunks_exact_mut(8).zip(words) {
                    c.copy_from_slice(&w.to_le_bytes());
                }
                let mut prg = ChaCha20Rng::from_seed(seed);
                (0..len).map(|_| prg.next_u64()).collect()
            }
            Piece::Full(v) => v.clone(),
        }
    }

    /// The words that are sealed: 4 for a seed, `len` for a full piece.
    pub fn words(&self) -> &[u64] {
        match self {
            Piece::Seed(w) => w,
            Piece::Full(v) => v,
        }
    }

    /// Reads back what [`Piece::words`] gave, for a key of `len` values.
    pub fn from_words(words: Vec<u64>, len: usize) -> Result<Piece, CryptoError> {
        if words.len() == 4 && len != 4 {
            Ok(Piece::Seed([words[0], words[1], words[2], words[3]]))
        } else if words.len() == len {
            Ok(Piece::Full(words))
        } else {
            Err(CryptoError::Length {
                expected: len,
                got: words.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    #[test]
    fn counts_follow_the_design() {
        let c = Committee::new(5, 3).unwrap();
        assert_eq!(c.pieces(), 10);
        assert!((0..5).all(|m| c.pieces_of(m).len() == 6));
        assert_eq!(Committee::default_for(9).unwrap(), c);
        assert_eq!(Committee::default_for(1).unwrap().pieces(), 1);
        assert!(Committee::new(4, 2).is_err(), "2 of 4 is not a majority");
        assert!(Committee::new(3, 4).is_err());
    }

    #[test]
    fn pieces_add_up_to_the_secret() {
        let c = Committee::new(5, 3).unwrap();
        let secret = vec![1u64, 0, u64::MAX, 42];
        let pieces = c.share(&secret, &mut ChaCha8Rng::seed_from_u64(1));
        let mut sum = vec![0u64; 4];
        for p in &pieces {
            for (s, v) in sum.iter_mut().zip(p) {
                *s = s.wrapping_add(*v);
            }
        }
        assert_eq!(sum, secret);
        // As sent: all pieces but the last are 32-byte seeds.
        let compact = c.share_compact(&secret, &mut ChaCha8Rng::seed_from_u64(1));
        assert!(compact[..9].iter().all(|p| p.words().len() == 4));
        assert!(matches!(&compact[9], Piece::Full(v) if v.len() == 4));
        let back = Piece::from_words(compact[0].words().to_vec(), 2048).unwrap();
        assert_eq!(back.expand(2048), compact[0].expand(2048));
        assert!(Piece::from_words(vec![1, 2, 3], 2048).is_err());
    }

    #[test]
    fn any_t_cover_every_piece_and_no_t_minus_one_do() {
        let c = Committee::new(5, 3).unwrap();
        for group in subsets(5, 3) {
            assert!(c.assign(&group).is_ok(), "{group:?}");
        }
        for group in subsets(5, 2) {
            let covered = (0..c.pieces()).all(|k| group.iter().any(|&m| c.holds(m, k)));
            assert!(!covered, "{group:?} must miss a piece");
            assert!(c.assign(&group).is_err());
        }
        // Each piece is assigned exactly once.
        let a = c.assign(&[4, 0, 2, 1]).unwrap();
        assert_eq!(a.len(), 10);
        assert!(a.iter().all(|&(k, m)| c.holds(m, k)));
    }
}
