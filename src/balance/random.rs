//! Weighted random: each pick independent, shares proportional to weight.

use std::sync::Arc;

use super::Balance;
use crate::upstream::Backend;

/// Weighted random over prefix sums (binary search per pick).
#[derive(Debug)]
pub struct Random {
    /// prefix[i] = sum of weights 0..=i.
    prefix: Vec<u64>,
}

impl Random {
    /// Precomputes the prefix sums of the backends' weights.
    pub fn new(backends: &[Arc<Backend>]) -> Self {
        let mut total = 0u64;
        let prefix = backends
            .iter()
            .map(|b| {
                total += u64::from(b.weight.max(1));
                total
            })
            .collect();
        Random { prefix }
    }

    fn draw(&self) -> Option<usize> {
        let total = *self.prefix.last()?;
        let r = fastrand::u64(..total);
        Some(self.prefix.partition_point(|&p| p <= r))
    }
}

impl Balance for Random {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len().min(self.prefix.len());
        if n == 0 {
            return None;
        }
        for _ in 0..4 {
            let i = self.draw()?;
            if i < n && !skip(i) {
                return Some(i);
            }
        }
        super::next_available(n, fastrand::usize(..n), skip)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn shares_follow_weights() {
        let p = pool(&[1, 2, 3]);
        let c = counts(&Random::new(&p), &p, 60_000, NONE);
        for (i, want) in [10_000.0, 20_000.0, 30_000.0].iter().enumerate() {
            let got = c[i] as f64;
            assert!((got - want).abs() / want < 0.05, "{c:?}");
        }
    }
}
