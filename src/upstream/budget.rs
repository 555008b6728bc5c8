//! The retry budget: retries may add at most `budget_percent` to an upstream's request rate.
//!
//! A token bucket in thousandths of a retry (Finagle's and Linkerd's retry budget): each
//! request deposits `budget_percent` x 10, and a retry may be taken while the bucket holds
//! anything (it then withdraws 1000, and may go below zero). So retries stay within the
//! percentage of requests rounded up: the first request of a quiet upstream may be retried
//! (20 % of one request, rounded up), the next one only after five more (Finagle and
//! Linkerd add a reserve of 10 retries a second instead, which a small pool can exceed the
//! percentage with; SPEC: "retries may add at most this % to the request rate"), and
//! `budget_percent = 0` allows none. The bucket is capped at [`CAP`] retries, so a long
//! healthy stretch cannot bank a retry storm.

use std::sync::atomic::{AtomicI64, Ordering};

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
            milli: AtomicI64::new(0),
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
                (v > 0).then_some(v - 1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_the_percentage_rounded_up() {
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
        assert_eq!(retries, 1000 * 20 / 100);
    }

    #[test]
    fn a_quiet_upstreams_first_request_may_be_retried_and_zero_allows_none() {
        let budget = RetryBudget::new(20);
        budget.deposit();
        assert!(budget.try_withdraw(), "20 % of one request, rounded up");
        for _ in 0..4 {
            budget.deposit();
            assert!(!budget.try_withdraw());
        }
        budget.deposit();
        assert!(budget.try_withdraw(), "one more after five more requests");
        let none = RetryBudget::new(0);
        for _ in 0..100 {
            none.deposit();
            assert!(!none.try_withdraw());
        }
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
}
