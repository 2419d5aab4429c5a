//! The train/validation split of documents, decided while streaming.
//!
//! Rule 2 (`DataMeta::split_rule`): of the `N` non-empty documents in corpus order, exactly
//! `n_val = round(N · val_fraction)` (at least one when `val_fraction > 0`, at most `N − 1`)
//! are held out, a uniformly random subset drawn by sequential selection sampling (Knuth,
//! TAOCP vol. 2, §3.4.2, Algorithm S): document `i` is held out with probability
//! `(n_val − chosen) / (N − i)`, its uniform draw being `mix64(seed, i)`. The state is two
//! counters, so memory stays constant and a resumed preparation continues the same draw.
//! (Rule 1, before streaming, drew the subset with `rand::seq::index::sample`.)

/// Version of the split rule above, recorded in `meta.json`.
pub(crate) const SPLIT_RULE: u32 = 2;

/// SplitMix64 of `(seed, index)`: unrelated 64-bit values for neighbouring pairs.
pub(crate) fn mix64(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How many of `documents` documents a `val_fraction` holds out.
pub(crate) fn val_count(documents: u64, val_fraction: f64) -> Result<u64, String> {
    if val_fraction == 0.0 {
        return Ok(0);
    }
    if documents < 2 {
        return Err(format!(
            "a validation split needs at least two documents and the corpus has {documents}; \
             pass val_fraction 0 or more text"
        ));
    }
    Ok(((documents as f64 * val_fraction).round() as u64).clamp(1, documents - 1))
}

/// Algorithm S over `total` documents choosing `target` of them.
#[derive(Debug, Clone)]
pub(crate) struct ValSampler {
    seed: u64,
    total: u64,
    target: u64,
    seen: u64,
    chosen: u64,
}

impl ValSampler {
    /// A sampler that has already decided `seen` documents, `chosen` of them held out.
    pub(crate) fn resume(seed: u64, total: u64, target: u64, seen: u64, chosen: u64) -> Self {
        Self {
            seed,
            total,
            target,
            seen,
            chosen,
        }
    }

    /// Whether the next document is held out; `None` past the last document.
    pub(crate) fn next_is_val(&mut self) -> Option<bool> {
        let remaining = self.total.checked_sub(self.seen).filter(|&r| r > 0)?;
        let needed = self.target - self.chosen;
        // u / 2^64 < needed / remaining, in exact integer arithmetic.
        let u = mix64(self.seed, self.seen) as u128;
        let take = u * (remaining as u128) < (needed as u128) << 64;
        self.seen += 1;
        self.chosen += take as u64;
        Some(take)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(seed: u64, total: u64, target: u64) -> Vec<bool> {
        let mut s = ValSampler::resume(seed, total, target, 0, 0);
        let out: Vec<bool> = (0..total).map(|_| s.next_is_val().unwrap()).collect();
        assert_eq!(s.next_is_val(), None);
        out
    }

    #[test]
    fn chooses_exactly_the_target_count() {
        for (total, target) in [(1, 0), (2, 1), (10, 9), (10, 10), (1000, 7), (57, 0)] {
            for seed in 0..50 {
                let n = draw(seed, total, target).iter().filter(|&&v| v).count();
                assert_eq!(
                    n as u64, target,
                    "total {total} target {target} seed {seed}"
                );
            }
        }
    }

    #[test]
    fn every_position_is_equally_likely() {
        // 20 000 seeds, 5 of 40 held out: each position's frequency is 1/8 with a standard
        // error of 0.0023; a sampler biased towards early or late documents fails this.
        let (total, target, seeds) = (40u64, 5u64, 20_000u64);
        let mut hits = vec![0u32; total as usize];
        for seed in 0..seeds {
            for (i, v) in draw(seed, total, target).into_iter().enumerate() {
                hits[i] += v as u32;
            }
        }
        for (i, &h) in hits.iter().enumerate() {
            let p = h as f64 / seeds as f64;
            assert!((p - 0.125).abs() < 0.012, "position {i}: {p}");
        }
    }

    #[test]
    fn resuming_continues_the_same_draw() {
        let full = draw(7, 100, 13);
        let mut s = ValSampler::resume(7, 100, 13, 0, 0);
        let head: Vec<bool> = (0..37).map(|_| s.next_is_val().unwrap()).collect();
        let chosen = head.iter().filter(|&&v| v).count() as u64;
        let mut r = ValSampler::resume(7, 100, 13, 37, chosen);
        let tail: Vec<bool> = (37..100).map(|_| r.next_is_val().unwrap()).collect();
        assert_eq!([head, tail].concat(), full);
        assert_ne!(draw(8, 100, 13), full);
    }

    #[test]
    fn val_counts() {
        assert_eq!(val_count(22, 0.2), Ok(4));
        assert_eq!(val_count(371, 0.02), Ok(7));
        assert_eq!(val_count(3, 0.001), Ok(1));
        assert_eq!(val_count(3, 0.99), Ok(2));
        assert_eq!(val_count(1, 0.0), Ok(0));
        assert!(val_count(1, 0.1).unwrap_err().contains("two documents"));
    }
}
