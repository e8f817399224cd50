//! The recent denials, kept so that an admin can look one up by id and a
//! caller can escalate it. Bounded by count and by age; the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::DenialEvent;
use crate::id::DenialId;

/// A stored denial and who it was given to.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The event.
    pub event: Arc<DenialEvent>,
    /// Who was denied: the identity, else the client address (for checking
    /// that only they escalate it).
    pub client_key: String,
    /// When it was stored.
    pub at: Instant,
}

/// Recent denials by id.
#[derive(Debug)]
pub struct RecentStore {
    max: usize,
    max_age: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<DenialId, Recorded>,
    order: VecDeque<(Instant, DenialId)>,
}

impl RecentStore {
    /// A store of at most `max` denials, none older than `max_age`.
    pub fn new(max: usize, max_age: Duration) -> Self {
        Self {
            max,
            max_age,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Keeps a denial.
    pub fn insert(&self, id: DenialId, recorded: Recorded) {
        if self.max == 0 {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = recorded.at;
        inner.order.push_back((now, id));
        inner.by_id.insert(id, recorded);
        while inner.order.len() > self.max
            || inner
                .order
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > self.max_age)
        {
            if let Some((_, old)) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
    }

    /// A recent denial, unless it has aged out.
    pub fn get(&self, id: &DenialId) -> Option<Recorded> {
        let inner = self.inner.lock().ok()?;
        let found = inner.by_id.get(id)?;
        (found.at.elapsed() <= self.max_age).then(|| found.clone())
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.by_id.len())
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
