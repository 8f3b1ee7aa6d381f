//! Plain row copies where libtorch's ops cost more than the bytes: a prompt's keys or values
//! into their slots of the paged KV pool, and a kept decode step's token embeddings
//! (`gather_rows`).
//!
//! libtorch's `index_copy_` did this, one call per layer for the keys and one for the values,
//! on one thread while the other waited: in a `perf` profile with call graphs of 128-token
//! bf16 prefills (AMX Xeon VM), 9% of the main thread's samples were under it. With this
//! copy the prefills took 43.3 / 45.5 / 43.5 ms against 44.8 / 46.3 / 44.3 (medians of 20,
//! interleaved). A row is a few hundred
//! contiguous bytes at each end, so a plain copy per row does it, split across libtorch's
//! threads when the slots are distinct. (Decode rows take `rope_store`, which rotates the
//! keys and stores both in the same pass.)

use tch::{Device, Tensor};

use super::element::kernels_on;

/// Copies each of `rows` (keys and values, `[T, kv_heads, head_dim]`, each row's elements
/// contiguous) into its pool tensor of `pools` (`[slots, kv_heads, head_dim]`, contiguous) at
/// `slots` (`[T]`, i64), as `pool.index_copy_(0, slots, rows)` would; returns false, having
/// written nothing, where the kernel does not apply and the caller should use libtorch. Both in
/// one call, so that the slots are checked once and the copies share one parallel region.
///
/// # Safety
/// The pools are written through their data pointers: the caller must hold them exclusively
/// (the KV pool's `&mut self`), and no tensor of `rows` may share storage with them.
pub unsafe fn store_rows(pools: [&Tensor; 2], slots: &Tensor, rows: [&Tensor; 2]) -> bool {
    let t = slots.size().first().copied().unwrap_or(-1);
    // `(pool slots, bytes of a row, bytes between rows of `rows`)` where a pair fits.
    let fits = |pool: &Tensor, rows: &Tensor| {
        let (Ok((size, heads, d)), Ok(shape)) = (pool.size3(), rows.size3()) else {
            return None;
        };
        let ok = kernels_on(pool.kind())
            && pool.device() == Device::Cpu
            && rows.device() == Device::Cpu
            && rows.kind() == pool.kind()
            && pool.is_contiguous()
            && shape == (t, heads, d)
            && rows.stride()[2] == 1
            && rows.stride()[1] == d;
        let elt = pool.kind().elt_size_in_bytes();
        ok.then(|| {
            (
                size,
                (heads * d) as usize * elt,
                rows.stride()[0] as usize * elt,
            )
        })
    };
    let (Some(k), Some(v)) = (fits(pools[0], rows[0]), fits(pools[1], rows[1])) else {
        return false;
    };
    if slots.device() != Device::Cpu
        || slots.kind() != tch::Kind::Int64
        || slots.dim() != 1
        || !slots.is_contiguous()
    {
        return false;
    }
    let t = t as usize;
    if t == 0 {
        // Nothing to copy (and an empty tensor's data pointer may be null, which a slice
        // must not be).
        return true;
    }
    // SAFETY: `slots` is a contiguous CPU i64 tensor of `t` elements, `t` > 0.
    let slots = std::slice::from_raw_parts(slots.data_ptr() as *const i64, t);
    if slots.iter().any(|&s| !(0..k.0.min(v.0)).contains(&s)) {
        return false;
    }
    let ptrs = [rows[0], pools[0], rows[1], pools[1]].map(|x| x.data_ptr() as usize);
    let run = |part: std::ops::Range<usize>| {
        let [k_src, k_dst, v_src, v_dst] = ptrs;
        for row in part {
            let slot = slots[row] as usize;
            for (src, dst, (_, bytes, stride)) in [(k_src, k_dst, k), (v_src, v_dst, v)] {
                // SAFETY: row `row` of the rows holds `bytes` contiguous bytes at its stride,
                // the slot lies in the pool (checked above), and the two do not overlap (the
                // caller's promise); parts are disjoint rows, with distinct slots when split.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src as *const u8).add(row * stride),
                        (dst as *mut u8).add(slot * bytes),
                        bytes,
                    )
                }
            }
        }
    };
    let elements = t * k.1 / pools[0].kind().elt_size_in_bytes();
    let split = elements >= super::norm::SPLIT_ELEMENTS && distinct(slots);
    super::threads::split(t, 1, split, &run);
    true
}

/// `out[i] = table[ids[i]]` for whole rows (an embedding lookup into a tensor the caller
/// keeps, as a kept decode step's input: `model::decode_plan`; its rotation tables' rows
/// too), by plain row copies: between
/// two weight streams of a bf16 batch-1 step (Zen 4 VM) libtorch's lookup took 28-34 µs
/// before its `copy_` into the kept input, the row copy and the step's slot checks 5.5. Returns
/// false, having written nothing, where it does not apply (any tensor not a contiguous CPU
/// one of these shapes and one dtype, or an id out of the table).
pub fn gather_rows(table: &Tensor, ids: &Tensor, out: &Tensor) -> bool {
    let (Ok((rows, width)), Ok((t, out_width))) = (table.size2(), out.size2()) else {
        return false;
    };
    let fits = [table, out]
        .iter()
        .all(|x| x.device() == Device::Cpu && x.is_contiguous())
        && table.kind() == out.kind()
        && width == out_width
        && ids.device() == Device::Cpu
        && ids.kind() == tch::Kind::Int64
        && ids.is_contiguous()
        && ids.size() == [t];
    if !fits || t == 0 {
        return fits;
    }
    // SAFETY: `ids` is a contiguous CPU i64 tensor of `t` > 0 elements.
    let ids = unsafe { std::slice::from_raw_parts(ids.data_ptr() as *const i64, t as usize) };
    if ids.iter().any(|&id| !(0..rows).contains(&id)) {
        return false;
    }
    let bytes = width as usize * table.kind().elt_size_in_bytes();
    for (i, &id) in ids.iter().enumerate() {
        // SAFETY: both are contiguous `[_, width]` tensors of one dtype, `id` is a row of the
        // table and `i` one of `out`, and they are different tensors.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (table.data_ptr() as *const u8).add(id as usize * bytes),
                (out.data_ptr() as *mut u8).add(i * bytes),
                bytes,
            )
        }
    }
    true
}

/// Whether no slot repeats: only then may threads write rows of the pool side by side.
pub fn distinct(slots: &[i64]) -> bool {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    sorted.windows(2).all(|p| p[0] != p[1])
}

#[cfg(test)]
mod tests {
    use super::super::element::testing::wave;
    use super::*;
    use tch::Kind;

    #[test]
    fn stores_as_index_copy_does_from_a_strided_view() {
        for kind in [Kind::Float, Kind::BFloat16] {
            if !kernels_on(kind) {
                continue;
            }
            // A few rows on one thread, and enough to be split across threads.
            for t in [3i64, 200] {
                let (heads, d, size) = (3i64, 64i64, 450i64);
                // The keys as a view into a wider row, as they come out of the fused qkv.
                let wide = wave(&[t, heads + 2, d], 0.29).to_kind(kind);
                let rows = wide.narrow(1, 1, heads);
                let values = (&rows * 3.0).contiguous();
                let slots = Tensor::from_slice(&(0..t).map(|i| (i * 7) % size).collect::<Vec<_>>());
                let before = wave(&[size, heads, d], 0.41).to_kind(kind);
                let (k_pool, v_pool) = (before.copy(), before.copy() * 2.0);
                // SAFETY: the pools are this test's own, not views of the rows.
                let stored = unsafe { store_rows([&k_pool, &v_pool], &slots, [&rows, &values]) };
                assert!(stored, "{kind:?} {t}");
                let mut want = before.copy();
                let _ = want.index_copy_(0, &slots, &rows);
                assert!(
                    k_pool.equal(&want),
                    "{kind:?} {t}: as index_copy_, no other slot touched"
                );
                let mut want = before.copy() * 2.0;
                let _ = want.index_copy_(0, &slots, &values);
                assert!(
                    v_pool.equal(&want),
                    "{kind:?} {t}: values as index_copy_, no other slot touched"
                );
            }
        }
    }

    #[test]
    fn declines_slots_outside_the_pool_and_mismatched_rows() {
        let pool = Tensor::zeros([8, 2, 16], (Kind::Float, Device::Cpu));
        let rows = Tensor::ones([2, 2, 16], (Kind::Float, Device::Cpu));
        let both = |pool| [pool, pool];
        // SAFETY: as above.
        unsafe {
            let store = |slots: &[i64], rows: &Tensor| {
                store_rows(both(&pool), &Tensor::from_slice(slots), [rows, rows])
            };
            assert!(!store(&[1, 8], &rows), "slot 8");
            assert!(!store(&[1, -1], &rows), "slot -1");
            let none = Tensor::ones([0, 2, 16], (Kind::Float, Device::Cpu));
            let no_slots = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
            if kernels_on(Kind::Float) {
                assert!(
                    store_rows(both(&pool), &no_slots, [&none, &none]),
                    "no rows: done, nothing written"
                );
            }
            let other = Tensor::ones([2, 3, 16], (Kind::Float, Device::Cpu));
            assert!(!store(&[1, 2], &other), "3 heads");
            let mixed = store_rows(
                both(&pool),
                &Tensor::from_slice(&[1i64, 2]),
                [&rows, &other],
            );
            assert!(!mixed, "values of 3 heads beside keys of 2");
        }
        assert_eq!(
            pool.abs().sum(Kind::Float).double_value(&[]),
            0.0,
            "nothing written"
        );
    }

    #[test]
    fn gathers_rows_as_an_embedding_lookup_does() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let table = wave(&[10, 24], 0.37).to_kind(kind);
            let ids = Tensor::from_slice(&[7i64, 0, 7, 9]);
            let out = Tensor::zeros([4, 24], (kind, Device::Cpu));
            assert!(gather_rows(&table, &ids, &out));
            assert!(out.equal(&table.index_select(0, &ids)), "{kind:?}");
            // An id past the table: nothing written.
            let fresh = Tensor::zeros([1, 24], (kind, Device::Cpu));
            assert!(!gather_rows(&table, &Tensor::from_slice(&[10i64]), &fresh));
            assert_eq!(fresh.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
