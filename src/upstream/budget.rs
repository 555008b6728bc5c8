//! The retry budget: retries may add at most `budget_percent` to an upstream's request rate.
//!
//! A token bucket in thousandths of a retry (Finagle's and Linkerd's retry budget): each
//! request deposits `budget_percent` x 10, each retry withdraws 1000. The bucket starts
//! with a reserve of [`RESERVE`] retries, so a quiet upstream can still retry, and is
//! capped at [`CAP`] retries, so a long healthy stretch cannot bank a retry storm.

use std::sync::atomic::{AtomicI64, Ordering};

/// Retries available before any request has been seen.
pub const RESERVE: i64 = 10;
/// The most retries the bucket holds.
pub const CAP: i64 = 100;

/// A retry budget for one upstream.
#[derive(Debug)]
pub struct RetryBudget {
    milli: AtomicI64,
    deposit: i64,
}

impl RetryBudget {
    /// A budget of `percent` % of the request rate.
    pub fn new(percent: u32) -> Self {
        RetryBudget {
            milli: AtomicI64::new(RESERVE * 1000),
            deposit: i64::from(percent.min(100)) * 10,
        }
    }

    /// Counts one request (first attempt).
    pub fn deposit(&self) {
        if self.deposit > 0 {
            self.milli.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_withdraw(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                let v = v.min(CAP * 1000);
                (v >= 1000).then_some(v - 1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_percentage_plus_the_reserve() {
        let budget = RetryBudget::new(20);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            // Every request wants two retries.
            for _ in 0..2 {
                if budget.try_withdraw() {
                    retries += 1;
                }
            }
        }
        assert_eq!(retries, 1000 * 20 / 100 + RESERVE);
    }

    #[test]
    fn a_long_healthy_stretch_banks_at_most_the_cap() {
        let budget = RetryBudget::new(100);
        for _ in 0..100_000 {
            budget.deposit();
        }
        let mut retries = 0;
        while budget.try_withdraw() {
            retries += 1;
        }
        assert_eq!(retries, CAP);
    }

    #[test]
    fn a_zero_budget_still_has_the_reserve() {
        let budget = RetryBudget::new(0);
        budget.deposit();
        let n = (0..50).filter(|_| budget.try_withdraw()).count() as i64;
        assert_eq!(n, RESERVE);
    }
}
