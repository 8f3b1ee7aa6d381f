//! RMSNorm and rotary embeddings of decode rows (the latter fused with the KV cache write),
//! each one pass instead of several libtorch ops.
//!
//! At one token per sequence these tensors hold a few hundred numbers, and libtorch's cost is
//! the ops themselves: `rms_norm` is a composite of about eight ops and takes 27 µs on a
//! 576-wide row on the Zen 3 VM, RoPE (two products, a roll and a sum) 14 µs. Plain loops do
//! the same arithmetic in a few microseconds; a batch-1 step of SmolLM2 went from 38.8 to
//! 35.4 ms (interleaved runs of the `step_profile` example). The roundings are libtorch's: f32 arithmetic, and in
//! bf16 a rounding (to nearest even) after every op that libtorch runs in bf16.

use tch::{Device, Kind, Tensor};

/// Whether kernels run for `kind` on this CPU (`TESSERA_NO_KERNELS` turns these off too).
/// These loops need no particular instruction set; they follow the others so that one switch
/// compares Tessera's kernels with libtorch alone.
fn kernels_on(kind: Kind) -> bool {
    super::isa(kind).is_some()
}

/// bf16 (the top half of an f32) widened to f32.
#[inline]
fn widen(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 rounded to the nearest bf16, ties to even, as libtorch converts (NaN stays NaN).
#[inline]
fn narrow(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Element access for the two dtypes the kernels take.
trait Element: Copy {
    fn get(self) -> f32;
    fn put(x: f32) -> Self;
    /// `x` as this dtype would hold it (a rounding for bf16, nothing for f32).
    fn round(x: f32) -> f32 {
        Self::put(x).get()
    }
}

impl Element for f32 {
    fn get(self) -> f32 {
        self
    }
    fn put(x: f32) -> Self {
        x
    }
}

/// bf16 as its bits.
#[derive(Clone, Copy)]
struct Bf16(u16);

impl Element for Bf16 {
    fn get(self) -> f32 {
        widen(self.0)
    }
    fn put(x: f32) -> Self {
        Bf16(narrow(x))
    }
}

/// `x` (`[rows, n]`) RMS-normalised with `weight` (`[n]`), or `None` where the kernel does not
/// apply. Llama's order: `weight * (x * rsqrt(mean(x²) + eps))`, the normalised row cast to the
/// dtype before the product; with `unit_offset` (Gemma) `x * rsqrt(..) * (1 + weight)` in f32,
/// cast at the end.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, unit_offset: bool) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    let y = rms_norm_output(x, weight)?;
    let (rows, n) = (rows as usize, n as usize);
    let eps = eps as f32;
    // SAFETY: `x`, `y` (`[rows, n]`) and `weight` (`[n]`) are contiguous CPU tensors of
    // `kind`, which is the element type each call reads; `y` is new, so nothing aliases it.
    unsafe {
        match kind {
            Kind::Float => rms_rows::<f32>(x, weight, &y, (rows, n), eps, unit_offset),
            Kind::BFloat16 => rms_rows::<Bf16>(x, weight, &y, (rows, n), eps, unit_offset),
            _ => return None,
        }
    }
    Some(y)
}

/// The output of normalising `x` (`[rows, n]`) with `weight` (`[n]`), or `None` where the
/// kernels do not take them.
fn rms_norm_output(x: &Tensor, weight: &Tensor) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    let fits = kernels_on(kind)
        && x.device() == Device::Cpu
        && weight.device() == Device::Cpu
        && weight.kind() == kind
        && weight.size() == [n]
        && x.is_contiguous()
        && weight.is_contiguous()
        && n > 0;
    fits.then(|| Tensor::empty([rows, n], (kind, Device::Cpu)))
}

/// # Safety
/// The tensors must be contiguous CPU tensors of `E`'s dtype and the shapes given.
unsafe fn rms_rows<E: Element>(
    x: &Tensor,
    weight: &Tensor,
    y: &Tensor,
    (rows, n): (usize, usize),
    eps: f32,
    unit_offset: bool,
) {
    let x = std::slice::from_raw_parts(x.data_ptr() as *const E, rows * n);
    let w = std::slice::from_raw_parts(weight.data_ptr() as *const E, n);
    let y = std::slice::from_raw_parts_mut(y.data_ptr() as *mut E, rows * n);
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        rms_row(xr, w, yr, eps, unit_offset);
    }
}

/// One row `x` normalised into `y` (see `rms_norm`).
#[inline]
fn rms_row<E: Element>(x: &[E], w: &[E], y: &mut [E], eps: f32, unit_offset: bool) {
    // Eight partial sums, so that the compiler can keep them in one vector.
    let mut part = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (p, v) in part.iter_mut().zip(c) {
            *p += v.get() * v.get();
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|v| v.get() * v.get()).sum();
    let r = 1.0 / ((part.iter().sum::<f32>() + tail) / x.len() as f32 + eps).sqrt();
    for ((yv, xv), wv) in y.iter_mut().zip(x).zip(w) {
        let h = xv.get() * r;
        *yv = if unit_offset {
            E::put(h * (1.0 + wv.get()))
        } else {
            E::put(wv.get() * E::round(h))
        };
    }
}

/// The residual add and the next norm in one pass: `x += a` in place (rounded to the dtype,
/// as libtorch's `add` rounds), then `rms_norm(x)` as a new tensor. Between two weight
/// streams the separate `add` cost about 15 µs a layer on the AMX Xeon VM, nearly all of it
/// libtorch's code and metadata coming back from memory. `None` where the kernel does not
/// apply (nothing is written then).
///
/// # Safety
/// `x` is written through its data pointer: the caller must hold it exclusively (no other
/// tensor may share its storage), and `a` must not share it either.
pub unsafe fn add_rms_norm(
    x: &Tensor,
    a: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
) -> Option<Tensor> {
    let kind = x.kind();
    let (rows, n) = x.size2().ok()?;
    if a.size() != [rows, n] || a.kind() != kind || a.device() != Device::Cpu || !a.is_contiguous()
    {
        return None;
    }
    let y = rms_norm_output(x, weight)?;
    let (rows, n, eps) = (rows as usize, n as usize, eps as f32);
    match kind {
        Kind::Float => add_rms_rows::<f32>([x, a, weight, &y], (rows, n), eps, unit_offset),
        Kind::BFloat16 => add_rms_rows::<Bf16>([x, a, weight, &y], (rows, n), eps, unit_offset),
        _ => return None,
    }
    Some(y)
}

/// # Safety
/// As `add_rms_norm` checks and requires.
unsafe fn add_rms_rows<E: Element>(
    [x, a, weight, y]: [&Tensor; 4],
    (rows, n): (usize, usize),
    eps: f32,
    unit_offset: bool,
) {
    let x = std::slice::from_raw_parts_mut(x.data_ptr() as *mut E, rows * n);
    let a = std::slice::from_raw_parts(a.data_ptr() as *const E, rows * n);
    let w = std::slice::from_raw_parts(weight.data_ptr() as *const E, n);
    let y = std::slice::from_raw_parts_mut(y.data_ptr() as *mut E, rows * n);
    for ((xr, ar), yr) in x
        .chunks_exact_mut(n)
        .zip(a.chunks_exact(n))
        .zip(y.chunks_exact_mut(n))
    {
        for (xv, av) in xr.iter_mut().zip(ar) {
            *xv = E::put(xv.get() + av.get());
        }
        rms_row(xr, w, yr, eps, unit_offset);
    }
}

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
    let (xp, yp) = (x.data_ptr() as *const E, y.data_ptr() as *mut E);
    let cos = std::slice::from_raw_parts(cos.data_ptr() as *const E, t * d);
    let sin = std::slice::from_raw_parts(sin.data_ptr() as *const E, t * d);
    for row in 0..t {
        let (c, s) = (&cos[row * d..][..d], &sin[row * d..][..d]);
        for head in 0..heads {
            let xr = std::slice::from_raw_parts(xp.add(row * row_stride + head * d), d);
            let yr = std::slice::from_raw_parts_mut(yp.add((row * heads + head) * d), d);
            rotate(xr, c, s, yr);
        }
    }
}

/// One head `x` rotated into `y` by a position's `cos` and signed `sin` rows.
#[inline]
fn rotate<E: Element>(x: &[E], c: &[E], s: &[E], y: &mut [E]) {
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
/// weight streams took 70 µs on the AMX Xeon VM (their code and metadata come back from
/// memory each time). `None` where the kernel does not apply.
///
/// # Safety
/// `keys` and `values` are written through their data pointers: the caller must hold them
/// exclusively (the pool's `&mut self`) and they must not share storage with `qkv`.
pub unsafe fn rope_store(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    (keys, values): (&Tensor, &Tensor),
    slots: &[i64],
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
        && slots.len() == t as usize
        && slots.iter().all(|&s| (0..pool).contains(&s));
    if !ok {
        return None;
    }
    let q = Tensor::empty([t, heads as i64, d], (kind, Device::Cpu));
    let shape = (t as usize, heads, kv_heads as usize, d as usize);
    let tensors = [qkv, cos, sin, &q, keys, values];
    match kind {
        Kind::Float => rope_store_rows::<f32>(tensors, shape, slots),
        Kind::BFloat16 => rope_store_rows::<Bf16>(tensors, shape, slots),
        _ => return None,
    }
    Some(q)
}

/// # Safety
/// As `rope_store` checks and requires.
unsafe fn rope_store_rows<E: Element>(
    [qkv, cos, sin, q, keys, values]: [&Tensor; 6],
    (t, heads, kv_heads, d): (usize, usize, usize, usize),
    slots: &[i64],
) {
    let width = (heads + 2 * kv_heads) * d;
    let kv = kv_heads * d;
    let src = std::slice::from_raw_parts(qkv.data_ptr() as *const E, t * width);
    let cos = std::slice::from_raw_parts(cos.data_ptr() as *const E, t * d);
    let sin = std::slice::from_raw_parts(sin.data_ptr() as *const E, t * d);
    let q = std::slice::from_raw_parts_mut(q.data_ptr() as *mut E, t * heads * d);
    let (kp, vp) = (keys.data_ptr() as *mut E, values.data_ptr() as *mut E);
    for (row, &slot) in slots.iter().enumerate() {
        let (c, s) = (&cos[row * d..][..d], &sin[row * d..][..d]);
        let x = &src[row * width..][..width];
        for (head, out) in q[row * heads * d..][..heads * d]
            .chunks_exact_mut(d)
            .enumerate()
        {
            rotate(&x[head * d..][..d], c, s, out);
        }
        let at = slot as usize * kv;
        let k_out = std::slice::from_raw_parts_mut(kp.add(at), kv);
        for (head, out) in k_out.chunks_exact_mut(d).enumerate() {
            rotate(&x[(heads + head) * d..][..d], c, s, out);
        }
        std::slice::from_raw_parts_mut(vp.add(at), kv).copy_from_slice(&x[heads * d + kv..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(shape: &[i64], step: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * step).sin() * 3.0).view(shape)
    }

    fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
        let err = (got.to_kind(Kind::Float) - want.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        let tol = if got.kind() == Kind::Float {
            1e-5
        } else {
            2e-2
        };
        assert!(err < tol, "{what}: error {err}");
    }

    #[test]
    fn rms_norm_matches_libtorch_and_gemma_order() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for (rows, n) in [(1, 576), (3, 17), (8, 64)] {
                let x = wave(&[rows, n], 0.37).to_kind(kind);
                let w = wave(&[n], 0.11).to_kind(kind);
                // transformers' LlamaRMSNorm, op by op.
                let h = x.to_kind(Kind::Float);
                let var = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                let want = &w * (&h * (&var + 1e-5).rsqrt()).to_kind(kind);
                let got = rms_norm(&x, &w, 1e-5, false).expect("kernel");
                assert_same(&got, &want, &format!("{kind:?} {rows}x{n}"));
                let want =
                    (h * (var + 1e-5).rsqrt() * (w.to_kind(Kind::Float) + 1.0)).to_kind(kind);
                let got = rms_norm(&x, &w, 1e-5, true).expect("kernel");
                assert_same(&got, &want, &format!("{kind:?} {rows}x{n} unit offset"));
            }
        }
    }

    #[test]
    fn rope_matches_the_libtorch_ops_on_strided_rows() {
        for kind in [Kind::Float, Kind::BFloat16] {
            // Queries and keys as a view into a wider row, as they come out of the fused qkv.
            let (t, heads, d) = (3, 5, 16);
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

    #[test]
    fn add_rms_norm_is_add_then_rms_norm() {
        for kind in [Kind::Float, Kind::BFloat16] {
            for unit_offset in [false, true] {
                let (rows, n) = (3, 576);
                let x0 = wave(&[rows, n], 0.37).to_kind(kind);
                let a = wave(&[rows, n], 0.23).to_kind(kind);
                let w = wave(&[n], 0.11).to_kind(kind);
                let sum = &x0 + &a;
                let want = rms_norm(&sum, &w, 1e-5, unit_offset).expect("kernel");
                let x = x0.copy();
                // SAFETY: `x` is this test's own copy.
                let got = unsafe { add_rms_norm(&x, &a, &w, 1e-5, unit_offset) }.expect("kernel");
                assert!(x.equal(&sum), "{kind:?}: x += a rounds as libtorch's add");
                assert!(
                    got.equal(&want),
                    "{kind:?} {unit_offset}: the norm of the sum"
                );
                let x = x0.copy();
                // SAFETY: as above.
                let refused = unsafe { add_rms_norm(&x, &a.narrow(1, 0, 8), &w, 1e-5, false) };
                assert!(
                    refused.is_none() && x.equal(&x0),
                    "a mismatched shape writes nothing"
                );
            }
        }
    }

    #[test]
    fn rope_store_is_rope_and_index_copy() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let (t, heads, kv_heads, d, slots) = (3, 6, 2, 16, 40);
            let qkv = wave(&[t, (heads + 2 * kv_heads) * d], 0.29).to_kind(kind);
            let cos = wave(&[t, 1, d], 0.13).to_kind(kind);
            let sin = wave(&[t, 1, d], 0.07).to_kind(kind);
            let at = [7i64, 39, 0];
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
                    &[1, slots, 2],
                )
            };
            assert!(outside.is_none(), "a slot outside the pool is refused");
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let x = wave(&[2, 8], 0.3);
        assert!(
            rms_norm(&x, &wave(&[7], 0.1), 1e-5, false).is_none(),
            "width"
        );
        assert!(
            rms_norm(&x.tr(), &wave(&[2], 0.1), 1e-5, false).is_none(),
            "strided"
        );
        let x = wave(&[2, 3, 8], 0.3);
        let table = wave(&[2, 1, 4], 0.1);
        assert!(rope(&x, &table, &table).is_none(), "partial rotary");
    }
}
