//! The decode rows' context slots, as the attention and rope-store kernels read them when
//! their work runs.
//!
//! A planned decode step (`model::decode_plan`) is kept and run again for the next step of a
//! batch of the same shape: building it took 0.76-0.90 ms of a 6-7 ms bf16 batch-1 step of
//! SmolLM2 on the Zen 4 VM, a step that reads only what is new from step to step. Of what a
//! step's kernels read, only the rows' context slots are not tensors at fixed addresses, so
//! the kernels read them through this shared table, which the step refills (`set`) before
//! each run, instead of capturing one step's slices.

use std::cell::UnsafeCell;
use std::sync::Arc;

/// Every decode row's context slots in position order (its last slot is the row's new token).
/// Clones share one table.
#[derive(Clone)]
pub struct Contexts(Arc<Table>);

/// The rows padded to one width, row-major, and each row's length.
#[derive(Default)]
struct Slots {
    flat: Vec<i64>,
    width: usize,
    lens: Vec<usize>,
}

struct Table(UnsafeCell<Slots>);

// SAFETY: the table is written only by `Contexts::set`, whose caller guarantees that no job
// reading it runs meanwhile (jobs run inside `Plan::run`, which returns when they are done);
// otherwise it is only read.
unsafe impl Sync for Table {}
unsafe impl Send for Table {}

impl Contexts {
    /// A table of `rows`.
    pub fn new(rows: &[&[i64]]) -> Self {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut flat = vec![0; rows.len() * width];
        for (row, slots) in flat.chunks_exact_mut(width.max(1)).zip(rows) {
            row[..slots.len()].copy_from_slice(slots);
        }
        let lens = rows.iter().map(|r| r.len()).collect();
        Self(Arc::new(Table(UnsafeCell::new(Slots {
            flat,
            width,
            lens,
        }))))
    }

    /// A table of one slot a row: rows whose only slot read is the new token's (`rope_store`).
    pub fn of_new_slots(slots: &[i64]) -> Self {
        let rows: Vec<&[i64]> = slots.iter().map(std::slice::from_ref).collect();
        Self::new(&rows)
    }

    /// Replaces the rows with `lens.len()` rows of `padded` (row-major, padded to one width).
    /// Returns false, changing nothing, where the lengths do not fit `padded`.
    ///
    /// # Safety
    /// Nothing may read the table meanwhile, through this or any clone: no job that reads it
    /// may be running, no row (`row`, `last`) may still be borrowed, and no other thread may
    /// call this at the same time.
    pub unsafe fn set(&self, padded: &[i64], lens: &[i64]) -> bool {
        let width = padded.len() / lens.len().max(1);
        if padded.len() != width * lens.len() || lens.iter().any(|&l| l < 0 || l as usize > width) {
            return false;
        }
        // SAFETY: the caller guarantees that nothing reads the table meanwhile.
        let slots = unsafe { &mut *self.0 .0.get() };
        slots.flat.clear();
        slots.flat.extend_from_slice(padded);
        slots.width = width;
        slots.lens.clear();
        slots.lens.extend(lens.iter().map(|&l| l as usize));
        true
    }

    fn slots(&self) -> &Slots {
        // SAFETY: `set` is never called while anything reads the table (its contract), so no
        // `&mut` to it exists while this shared reference lives.
        unsafe { &*self.0 .0.get() }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.slots().lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i`'s slots.
    pub fn row(&self, i: usize) -> &[i64] {
        let s = self.slots();
        &s.flat[i * s.width..][..s.lens[i]]
    }

    /// Row `i`'s last slot, its new token's; `None` for an empty row.
    pub fn last(&self, i: usize) -> Option<i64> {
        self.row(i).last().copied()
    }

    /// Whether every row has a slot and every slot lies in a pool of `pool` slots.
    pub fn within(&self, pool: usize) -> bool {
        (0..self.len()).all(|i| {
            let row = self.row(i);
            !row.is_empty() && row.iter().all(|&s| s >= 0 && (s as usize) < pool)
        })
    }

    /// Whether the rows' new slots are distinct, so that threads may write them at once.
    pub fn distinct_new_slots(&self) -> bool {
        let news: Option<Vec<i64>> = (0..self.len()).map(|i| self.last(i)).collect();
        news.is_some_and(|n| super::distinct(&n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_back_and_refill_in_place() {
        let c = Contexts::new(&[&[4, 5, 6], &[9]]);
        let shared = c.clone();
        assert_eq!((c.len(), c.row(0), c.row(1)), (2, &[4, 5, 6][..], &[9][..]));
        assert!(c.within(10) && !c.within(9) && c.distinct_new_slots());
        // SAFETY: nothing reads the table meanwhile.
        assert!(unsafe { c.set(&[1, 2, 0, 3, 4, 2], &[2, 3]) });
        assert_eq!((shared.row(0), shared.last(1)), (&[1, 2][..], Some(2)));
        assert!(!shared.distinct_new_slots());
        // A length beyond the padded width changes nothing.
        assert!(!unsafe { c.set(&[1, 2], &[3]) });
        assert_eq!(shared.len(), 2);
        assert_eq!(Contexts::of_new_slots(&[7, 8]).row(1), &[8]);
    }
}
