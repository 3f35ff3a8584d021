//! What a delivery was charged before it was submitted (one unit of its owner's daily
//! allowance), so the engine can give it back when the delivery is never attempted.

use std::{fmt, sync::Arc};

use chrono::NaiveDate;

/// Where a charge is given back to: an owner's count of deliveries per UTC day.
pub trait Ledger: Send + Sync {
    /// Gives back one delivery counted on `day`; nothing if that day is no longer counted.
    fn give_back(&self, day: NaiveDate);
}

/// One delivery counted against an owner's allowance on one day. The engine keeps it with the
/// delivery and gives it back if the delivery is dropped, or fails, without any attempt.
pub struct Charge {
    ledger: Arc<dyn Ledger>,
    day: NaiveDate,
}

impl Charge {
    /// A delivery counted on `day` in `ledger`.
    pub fn new(ledger: Arc<dyn Ledger>, day: NaiveDate) -> Self {
        Self { ledger, day }
    }

    /// Gives the delivery back: it was never attempted.
    pub fn refund(self) {
        self.ledger.give_back(self.day);
    }
}

impl fmt::Debug for Charge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Charge").field("day", &self.day).finish()
    }
}
