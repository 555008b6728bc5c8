//! Round robin: each backend in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{next_available, Balance};
use crate::upstream::Backend;

/// Each backend in turn; a skipped one passes its turn to the next.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// A balancer starting at the first backend.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Balance for RoundRobin {
    fn pick(
        &self,
        backends: &[Arc<Backend>],
        _key: u64,
        skip: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        // A skipped backend's turn goes to the next turn of the shared counter, not to its
        // neighbour in the list: the remaining backends split its share evenly.
        for _ in 0..n {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            if !skip(i) {
                return Some(i);
            }
        }
        next_available(n, self.next.load(Ordering::Relaxed) % n, skip)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn equal_shares_exactly() {
        let p = pool(&[1, 1, 1]);
        assert_eq!(counts(&RoundRobin::new(), &p, 300, NONE), [100, 100, 100]);
    }

    #[test]
    fn a_skipped_backend_splits_its_share() {
        let p = pool(&[1, 1, 1]);
        assert_eq!(
            counts(&RoundRobin::new(), &p, 300, &|i| i == 1),
            [150, 0, 150]
        );
    }
}
