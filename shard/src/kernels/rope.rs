//! Rotary embeddings, alone or (decode rows) fused with the KV cache write: one pass instead
//! of several libtorch ops (RoPE alone is two products, a roll and a sum, 14 µs a batch-1 row
//! on the Zen 3 VM). The roundings are libtorch's, as in `norm`.

use tch::{Device, Kind, Tensor};

use super::element::{kernels_on, Bf16, Element};
use super::{Contexts, Now, Sink};

/// `x` (`[T, heads, head_dim]`, rows may be strided) rotated by the tables `cos` and `sin`
/// (`[T, 1, head_dim]`, `sin` with its first half negated, as `Rope::tables` makes them): `x *
/// cos + roll(x, head_dim / 2) * sin` in a new contiguous tensor, or `None` where the kernel
/// does not apply (partial rotary dims among others).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Option<Tensor> {
    let kind = x.kind();
    let (t, heads, d) = x.size3().ok()?;
    let table = [t, 1, d];
    if !kernels_on(kind)
        || x.device() != Device::Cpu
        || cos.kind() != kind
        || sin.kind() != kind
        || cos.size() != table
        || sin.size() != table
        || !cos.is_contiguous()
        || !sin.is_contiguous()
        || x.stride()[2] != 1
        || x.stride()[1] != d
        || d % 2 != 0
    {
        return None;
    }
    let y = Tensor::empty([t, heads, d], (kind, Device::Cpu));
    let shape = (
        t as usize,
        heads as usize,
        d as usize,
        x.stride()[0] as usize,
    );
    // SAFETY: `x` covers `T` rows of `row_stride` elements whose first `heads * d` are the
    // heads (strides checked above), `cos`/`sin` are contiguous `[T, d]`, `y` is new and
    // contiguous; all of `kind`, the element type each call reads.
    unsafe {
        match kind {
            Kind::Float => rope_rows::<f32>(x, cos, sin, &y, shape),
            Kind::BFloat16 => rope_rows::<Bf16>(x, cos, sin, &y, shape),
            _ => return None,
        }
    }
    Some(y)
}

/// # Safety
/// As `rope` checks: the tensors' layouts must match `(T, heads, d, row_stride)`.
unsafe fn rope_rows<E: Element>(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    y: &Tensor,
    (t, heads, d, row_stride): (usize, usize, usize, usize),
) {
    if t == 0 {
        // An empty tensor's data pointer may be null, which the slices below must not be.
        return;
    }
    let ptrs = [x, cos, sin, y].map(|t| t.data_ptr() as usize);
    let run = |rows: std::ops::Range<usize>| {
        let [xp, cos, sin, yp] = ptrs;
        let (xp, yp) = (xp as *const E, yp as *mut E);
        // SAFETY: the layouts are as the caller promises, and parts are disjoint ranges of
        // rows, each writing only its own rows of `y`.
        unsafe {
            let cos = std::slice::from_raw_parts(cos as *const E, t * d);
            let sin = std::slice::from_raw_parts(sin as *const E, t * d);
            for row in rows {
                let (c, s) = (&cos[row * d..][..d], &sin[row * d..][..d]);
                for head in 0..heads {
                    let xr = std::slice::from_raw_parts(xp.add(row * row_stride + head * d), d);
                    let yr = std::slice::from_raw_parts_mut(yp.add((row * heads + head) * d), d);
                    rotate(xr, c, s, yr);
                }
            }
        }
    };
    // Split as the norms are: a prompt's rows ran on one thread while the other waited.
    super::threads::split(t, 1, t * heads * d >= super::norm::SPLIT_ELEMENTS, &run);
}

/// One head `x` rotated into `y` by a position's `cos` and signed `sin` rows: with vectors
/// where half a head is a whole number of them (head_dim 64 or 128: a batch-32 step of
/// SmolLM2 spent 4.8 ms in this loop one element at a time), else one element at a time.
#[inline]
fn rotate<E: Element>(x: &[E], c: &[E], s: &[E], y: &mut [E]) {
    let d = x.len();
    #[cfg(target_arch = "x86_64")]
    {
        use super::lanes::{Avx2, Avx512, Lanes};
        let fits = |width: usize| d.is_multiple_of(2 * width) && c.len() >= d && s.len() >= d;
        let ptrs = (
            x.as_ptr() as *const u8,
            c.as_ptr() as *const u8,
            s.as_ptr() as *const u8,
            y.as_mut_ptr() as *mut u8,
        );
        // SAFETY: `x` holds `d` elements of `E` and the guards check `c`, `s` and `y` hold
        // as many; the ISA is this CPU's.
        match super::isa(E::KIND) {
            Some(super::Isa::Avx512) if fits(Avx512::WIDTH) && y.len() >= d => {
                return unsafe { rotate_avx512::<E>(ptrs, d) };
            }
            Some(super::Isa::Avx2) if fits(Avx2::WIDTH) && y.len() >= d => {
                return unsafe { rotate_avx2::<E>(ptrs, d) };
            }
            _ => {}
        }
    }
    rotate_scalar(x, c, s, y);
}

/// `x`, `cos`, `sin` and `y` of one head, as raw element pointers.
#[cfg(target_arch = "x86_64")]
type Head = (*const u8, *const u8, *const u8, *mut u8);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rotate_avx512<E: Element>(head: Head, d: usize) {
    rotate_lanes::<super::lanes::Avx512, E>(head, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rotate_avx2<E: Element>(head: Head, d: usize) {
    rotate_lanes::<super::lanes::Avx2, E>(head, d)
}

/// `rotate_scalar`'s arithmetic a vector at a time; `d` a multiple of twice the width, so
/// that the rolled half starts on a vector boundary.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rotate_lanes<L: super::lanes::Lanes, E: Element>(head: Head, d: usize) {
    if E::BF16 {
        rotate_typed::<L, true>(head, d)
    } else {
        rotate_typed::<L, false>(head, d)
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rotate_typed<L: super::lanes::Lanes, const BF16: bool>((x, c, s, y): Head, d: usize) {
    let elt = if BF16 { 2 } else { 4 };
    let mut i = 0;
    while i < d {
        let turned = (i + d / 2) % d;
        let a = L::mul(
            L::load::<BF16>(x.add(i * elt)),
            L::load::<BF16>(c.add(i * elt)),
        );
        let b = L::mul(
            L::load::<BF16>(x.add(turned * elt)),
            L::load::<BF16>(s.add(i * elt)),
        );
        // libtorch rounds each product to bf16 before the sum (three ops).
        let (a, b) = if BF16 {
            (L::round_bf16(a), L::round_bf16(b))
        } else {
            (a, b)
        };
        L::store::<BF16>(y.add(i * elt), L::add(a, b));
        i += L::WIDTH;
    }
}

fn rotate_scalar<E: Element>(x: &[E], c: &[E], s: &[E], y: &mut [E]) {
    let d = x.len();
    let half = d / 2;
    for i in 0..d {
        // Three ops in libtorch, each rounded in bf16: two products and their sum.
        let turned = x[(i + half) % d].get();
        let a = E::round(x[i].get() * c[i].get());
        let b = E::round(turned * s[i].get());
        y[i] = E::put(a + b);
    }
}

/// The decode step's q/k/v in one pass: `qkv` (`[T, (heads + 2 × kv_heads) × d]`, contiguous,
/// as the fused projection makes it) has its queries and keys rotated as `rope` rotates them,
/// its keys and values stored into the pool tensors `keys`/`values` (`[slots, kv_heads, d]`)
/// at `slots[t]` (what `index_copy_` did), and its queries returned as `[T, heads, d]`. The
/// views, the two copies and the rotation cost nine libtorch ops a layer, which between two
/// weight streams took 70 µs on the AMX Xeon VM. `None` where the kernel does not apply.
///
/// # Safety
/// `keys` and `values` are written through their data pointers: the caller must hold them
/// exclusively (the pool's `&mut self`) and they must not share storage with `qkv`.
pub unsafe fn rope_store(
    qkv: &Tensor,
    tables: (&Tensor, &Tensor),
    heads: usize,
    pool: (&Tensor, &Tensor),
    slots: &[i64],
) -> Option<Tensor> {
    rope_store_in(
        qkv,
        tables,
        heads,
        pool,
        &Contexts::of_new_slots(slots),
        &mut Now,
    )
}

/// `rope_store`, its work into `sink`, each row's slot the last of its row in `rows`, read
/// when the work runs (a kept plan refills them between runs).
///
/// # Safety
/// As `rope_store`, until the work has run.
pub unsafe fn rope_store_in<'a>(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    (keys, values): (&Tensor, &Tensor),
    rows: &Contexts,
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    let kind = qkv.kind();
    let (t, width) = qkv.size2().ok()?;
    let (pool, kv_heads, d) = keys.size3().ok()?;
    let table = [t, 1, d];
    let ok = kernels_on(kind)
        && [qkv, cos, sin, keys, values]
            .iter()
            .all(|x| x.device() == Device::Cpu && x.kind() == kind && x.is_contiguous())
        && cos.size() == table
        && sin.size() == table
        && values.size() == keys.size()
        && width == (heads as i64 + 2 * kv_heads) * d
        && d % 2 == 0
        && rows.len() == t as usize
        && rows.within(pool as usize);
    if !ok {
        return None;
    }
    let q = Tensor::empty([t, heads as i64, d], (kind, Device::Cpu));
    let shape = (t as usize, heads, kv_heads as usize, d as usize);
    let tensors = [qkv, cos, sin, &q, keys, values];
    match kind {
        Kind::Float => rope_store_rows::<f32>(tensors, shape, rows, sink),
        Kind::BFloat16 => rope_store_rows::<Bf16>(tensors, shape, rows, sink),
        _ => return None,
    }
    Some(q)
}

/// The rows are split across libtorch's threads from `SPLIT_ELEMENTS`, as the norms are:
/// on one thread, a batch-32 bf16 step spent 2.8% of its time here while the other waited
/// (`perf`, AMX Xeon VM). Only where the slots are distinct, so that no two threads write one
/// row of the pool.
///
/// # Safety
/// As `rope_store` checks and requires.
unsafe fn rope_store_rows<'a, E: Element>(
    tensors: [&Tensor; 6],
    (t, heads, kv_heads, d): (usize, usize, usize, usize),
    rows: &Contexts,
    sink: &mut impl Sink<'a>,
) {
    let width = (heads + 2 * kv_heads) * d;
    let kv = kv_heads * d;
    for x in tensors {
        sink.keep(x);
    }
    let ptrs = tensors.map(|x| x.data_ptr() as usize);
    // A kept plan runs again only for rows whose new slots are distinct where these were
    // (part of its key in `model::decode_plan`), and within the pool (checked before each run).
    let split = t * width >= super::norm::SPLIT_ELEMENTS && rows.distinct_new_slots();
    let slots = rows.clone();
    let run = move |rows: std::ops::Range<usize>| {
        let [src, cos, sin, q, kp, vp] = ptrs;
        // SAFETY: the tensors are contiguous and hold these shapes (`rope_store` checked
        // them), every slot lies in the pool, and parts are disjoint ranges of rows, whose
        // slots are distinct when they run on several threads.
        unsafe {
            for row in rows {
                let slot = slots.last(row).unwrap_or(0) as usize;
                let at = |p: usize, i: usize| (p as *const E).add(i);
                let c = std::slice::from_raw_parts(at(cos, row * d), d);
                let s = std::slice::from_raw_parts(at(sin, row * d), d);
                let x = std::slice::from_raw_parts(at(src, row * width), width);
                let q_out =
                    std::slice::from_raw_parts_mut((q as *mut E).add(row * heads * d), heads * d);
                for (head, out) in q_out.chunks_exact_mut(d).enumerate() {
                    rotate(&x[head * d..][..d], c, s, out);
                }
                let k_out = std::slice::from_raw_parts_mut((kp as *mut E).add(slot * kv), kv);
                for (head, out) in k_out.chunks_exact_mut(d).enumerate() {
                    rotate(&x[(heads + head) * d..][..d], c, s, out);
                }
                std::slice::from_raw_parts_mut((vp as *mut E).add(slot * kv), kv)
                    .copy_from_slice(&x[heads * d + kv..]);
            }
        }
    };
    sink.split(t, 1, split, run);
}

#[cfg(test)]
mod tests {
    use super::super::element::testing::{assert_same, wave};
    use super::*;

    #[test]
    fn rope_matches_the_libtorch_ops_on_strided_rows() {
        for kind in [Kind::Float, Kind::BFloat16] {
            // Queries and keys as a view into a wider row, as they come out of the fused qkv.
            for d in [16, 64] {
                let (t, heads) = (3, 5);
                let wide = wave(&[t, heads * d + 24], 0.29).to_kind(kind);
                let x = wide.narrow(1, 0, heads * d).view([t, heads, d]);
                let cos = wave(&[t, 1, d], 0.13).to_kind(kind);
                let sin = wave(&[t, 1, d], 0.07).to_kind(kind);
                let got = rope(&x, &cos, &sin).expect("kernel");
                let want = &x * &cos + x.roll([d / 2], [2]) * &sin;
                assert_same(&got, &want, &format!("{kind:?}"));
                if kind == Kind::BFloat16 {
                    assert!(got.equal(&want), "bf16 rounds as libtorch does, op by op");
                }
            }
        }
    }

    #[test]
    fn rope_store_is_rope_and_index_copy() {
        // A few rows on one thread, and 40 rows (past `SPLIT_ELEMENTS`) split across threads.
        let many: Vec<i64> = (0..40).rev().map(|i| 2 * i + 1).collect();
        let cases = [(3, 16, vec![7i64, 39, 0]), (40, 64, many)];
        for (kind, (t, d, at)) in [Kind::Float, Kind::BFloat16]
            .into_iter()
            .flat_map(|kind| cases.clone().map(|case| (kind, case)))
        {
            let (heads, kv_heads, slots) = (6, 2, 81);
            let qkv = wave(&[t, (heads + 2 * kv_heads) * d], 0.29).to_kind(kind);
            let cos = wave(&[t, 1, d], 0.13).to_kind(kind);
            let sin = wave(&[t, 1, d], 0.07).to_kind(kind);
            let before = wave(&[slots, kv_heads, d], 0.41).to_kind(kind);
            let (keys, values) = (before.copy(), before.copy() * 2.0);
            // SAFETY: the pool tensors are this test's own and not views of `qkv`.
            let q =
                unsafe { rope_store(&qkv, (&cos, &sin), heads as usize, (&keys, &values), &at) }
                    .expect("kernel");
            let rotated = rope(
                &qkv.narrow(1, 0, (heads + kv_heads) * d)
                    .view([t, heads + kv_heads, d]),
                &cos,
                &sin,
            )
            .expect("kernel");
            assert!(q.equal(&rotated.narrow(1, 0, heads)), "{kind:?} queries");
            let index = Tensor::from_slice(&at);
            let mut want_k = before.copy();
            let _ = want_k.index_copy_(0, &index, &rotated.narrow(1, heads, kv_heads));
            let mut want_v = before.copy() * 2.0;
            let v = qkv
                .narrow(1, (heads + kv_heads) * d, kv_heads * d)
                .view([t, kv_heads, d]);
            let _ = want_v.index_copy_(0, &index, &v);
            assert!(
                keys.equal(&want_k),
                "{kind:?} keys, and no other slot touched"
            );
            assert!(
                values.equal(&want_v),
                "{kind:?} values, and no other slot touched"
            );
            // SAFETY: as above.
            let outside = unsafe {
                rope_store(
                    &qkv,
                    (&cos, &sin),
                    heads as usize,
                    (&keys, &values),
                    &[vec![1, slots], vec![2; t as usize - 2]].concat(),
                )
            };
            assert!(outside.is_none(), "a slot outside the pool is refused");
        }
    }

    /// Both vector builds against the scalar loop, bit for bit, at head sizes that take them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rotate_vectors_match_the_scalar_loop() {
        fn check<E: Element>(from: impl Fn(f32) -> E, bits: impl Fn(E) -> u32) {
            for d in [16usize, 64, 128] {
                let wave = |step: f32| -> Vec<E> {
                    (0..d)
                        .map(|i| from((i as f32 * step).sin() * 3.0))
                        .collect()
                };
                let (x, c, s) = (wave(0.29), wave(0.13), wave(0.07));
                let mut want = vec![from(0.0); d];
                rotate_scalar(&x, &c, &s, &mut want);
                let head = |y: &mut Vec<E>| {
                    (
                        x.as_ptr() as *const u8,
                        c.as_ptr() as *const u8,
                        s.as_ptr() as *const u8,
                        y.as_mut_ptr() as *mut u8,
                    )
                };
                let mut isas = vec![super::super::Isa::Avx2];
                if super::super::isa(E::KIND) == Some(super::super::Isa::Avx512) {
                    isas.push(super::super::Isa::Avx512);
                }
                for isa in isas {
                    let width = if isa == super::super::Isa::Avx512 {
                        16
                    } else {
                        8
                    };
                    if d % (2 * width) != 0 || super::super::isa(E::KIND).is_none() {
                        continue;
                    }
                    let mut got = vec![from(0.0); d];
                    // SAFETY: every buffer holds `d` elements; the CPU has the ISA.
                    unsafe {
                        match isa {
                            super::super::Isa::Avx512 => rotate_avx512::<E>(head(&mut got), d),
                            super::super::Isa::Avx2 => rotate_avx2::<E>(head(&mut got), d),
                        }
                    }
                    let same = got.iter().zip(&want).all(|(g, w)| bits(*g) == bits(*w));
                    assert!(same, "{isa:?} d={d} bf16={}", E::BF16);
                }
            }
        }
        check::<f32>(|x| x, |v| v.to_bits());
        check::<Bf16>(Bf16::put, |v| v.0 as u32);
    }

    #[test]
    fn declines_partial_rotary() {
        let x = wave(&[2, 3, 8], 0.3);
        let table = wave(&[2, 1, 4], 0.1);
        assert!(rope(&x, &table, &table).is_none(), "partial rotary");
    }
}
