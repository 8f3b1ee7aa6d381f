//! Decode attention straight from the paged KV pool: one query token per sequence against its
//! context, read through the slot table without gathering K/V into new tensors.
//!
//! For every sequence and KV head, the query heads of its group (up to three at a time, each
//! K and V row read once for all of them) score each context key (a dot product of `head_dim`
//! lanes), take a softmax in f32 (with Gemma-style soft-capping and a sliding window when the
//! layer has one), and accumulate the values in f32 registers. The
//! libtorch alternative spends most of its time on the gathers and on per-op overhead, which
//! at one token per sequence is most of the work. The loop is written once over a small
//! vector interface (`Lanes`) and built for AVX-512 and for AVX2 + FMA.

use tch::{Kind, Tensor};

#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512, Lanes};
#[cfg(target_arch = "x86_64")]
use super::prefetch;
use super::{isa, Contexts, Isa, Now, Sink};

/// Shape and score shaping of one layer's attention.
#[derive(Clone, Copy, Debug)]
pub struct DecodeShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
}

/// Attention of `q` (`[B, heads, head_dim]`) over the pool tensors `keys`/`values`
/// (`[slots, kv_heads, head_dim]`), sequence `b` seeing the slots `context[b]` in position
/// order. Returns `[B, heads * head_dim]` in the pool's dtype, or `None` when no kernel applies.
pub fn decode_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    context: &[&[i64]],
    shape: DecodeShape,
) -> Option<Tensor> {
    decode_attention_in(q, keys, values, &Contexts::new(context), shape, &mut Now)
}

/// `decode_attention`, its work into `sink`, reading the rows' slots from `context` when it
/// runs (which a kept plan refills between runs).
pub fn decode_attention_in<'a>(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    context: &Contexts,
    shape: DecodeShape,
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    decode_attention_on(isa(keys.kind())?, q, keys, values, context, shape, sink)
}

/// `decode_attention` with a chosen instruction set, which the caller has checked the CPU has.
fn decode_attention_on<'a>(
    isa: Isa,
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    context: &Contexts,
    shape: DecodeShape,
    sink: &mut impl Sink<'a>,
) -> Option<Tensor> {
    let kind = keys.kind();
    let (b, h, d) = q.size3().ok()?;
    let DecodeShape {
        num_heads,
        num_kv_heads,
        head_dim,
        ..
    } = shape;
    let slots = keys.size().first().copied()? as usize;
    if q.device() != tch::Device::Cpu
        || q.kind() != kind
        || values.kind() != kind
        || b as usize != context.len()
        || h as usize != num_heads
        || d as usize != head_dim
        || head_dim % 16 != 0
        || num_heads % num_kv_heads != 0
        || !keys.is_contiguous()
        || !values.is_contiguous()
        || !context.within(slots)
        || !matches!(kind, Kind::Float | Kind::BFloat16)
    {
        return None;
    }
    let prepared = q.contiguous();
    if !sink.unchanged(q, &prepared) {
        return None;
    }
    let q = prepared;
    let out = Tensor::empty([b, h * d], (kind, tch::Device::Cpu));
    for t in [&q, keys, values, &out] {
        sink.keep(t);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Addresses, so that parts of the work can run on libtorch's other threads.
        let (qp, kp, vp, op) = (
            q.data_ptr() as usize,
            keys.data_ptr() as usize,
            values.data_ptr() as usize,
            out.data_ptr() as usize,
        );
        let bf16 = kind == Kind::BFloat16;
        // A small step stays on this thread when run now: the 64K multiply-add cut is a guess
        // at where a hand-off (a few microseconds) stops paying, not a measured crossover. In
        // a plan the other threads wait at the job's barrier either way, so it always splits
        // (and a kept plan need not change with the contexts' lengths).
        let work: usize =
            (0..b as usize).map(|i| context.row(i).len()).sum::<usize>() * num_heads * head_dim;
        let split = sink.planned() || work >= 1 << 16;
        let count = b as usize * num_kv_heads;
        let (context, warm_context) = (context.clone(), context.clone());
        // One job per sequence and KV head; a part is a range of jobs.
        let run = move |jobs: std::ops::Range<usize>| {
            let context = &context;
            let mut scores = Vec::new();
            for index in jobs.clone() {
                let (seq, kvh) = (index / num_kv_heads, index % num_kv_heads);
                // Each KV head's job asks for its share of the next sequence's rows, when
                // that sequence is this part's too (`Job::next`).
                let next = ((seq + 1) * num_kv_heads < jobs.end)
                    .then(|| context.row(seq + 1))
                    .map(|slots| {
                        let from = shape.window.map_or(0, |w| slots.len().saturating_sub(w));
                        let seen = &slots[from..];
                        let per = seen.len().div_ceil(num_kv_heads);
                        &seen[(kvh * per).min(seen.len())..((kvh + 1) * per).min(seen.len())]
                    });
                let job = Job {
                    shape,
                    ctx: context.row(seq),
                    next,
                    kv_head: kvh,
                    first_head: seq * num_heads + kvh * (num_heads / num_kv_heads),
                };
                let ptrs = (
                    qp as *const u8,
                    kp as *const u8,
                    vp as *const u8,
                    op as *mut u8,
                );
                // SAFETY: `q`, `keys`, `values` and `out` are contiguous CPU tensors of `kind` with
                // the shapes checked above, alive until the work has run (the sink keeps them);
                // every slot is inside the pool; jobs write disjoint heads of `out`; the caller
                // checked the CPU features.
                unsafe {
                    match (isa, bf16) {
                        (Isa::Avx512, false) => job.run_avx512::<false>(ptrs, &mut scores),
                        (Isa::Avx512, true) => job.run_avx512::<true>(ptrs, &mut scores),
                        (Isa::Avx2, false) => job.run_avx2::<false>(ptrs, &mut scores),
                        (Isa::Avx2, true) => job.run_avx2::<true>(ptrs, &mut scores),
                    }
                }
            }
        };
        sink.split(count, 1, split, run);
        // What a part reads first: its jobs' K and V heads over their contexts, up to `WARM`
        // bytes, asked for into L2 by a thread waiting before the job (at batch 1 the second
        // thread, while the first rotates and stores the new keys).
        let elt = if bf16 { 2 } else { 4 };
        let (row, head) = (num_kv_heads * head_dim * elt, head_dim * elt);
        sink.warm(move |jobs: std::ops::Range<usize>| {
            let mut left = WARM;
            for index in jobs {
                let (seq, kvh) = (index / num_kv_heads, index % num_kv_heads);
                let slots = warm_context.row(seq);
                let from = shape.window.map_or(0, |w| slots.len().saturating_sub(w));
                for &slot in &slots[from..] {
                    if left < 2 * head {
                        return;
                    }
                    let at = slot as usize * row + kvh * head;
                    // SAFETY: prefetch hints cannot fault.
                    unsafe {
                        prefetch((kp as *const u8).wrapping_add(at), head);
                        prefetch((vp as *const u8).wrapping_add(at), head);
                    }
                    left -= 2 * head;
                }
            }
        });
    }
    Some(out)
}

/// The most K and V bytes a thread asks for ahead of one job of a planned attention
/// (`Sink::warm`; a waiting thread warms up to `Warming::PIECES` jobs, one at a time): a KV
/// head's context of 384 tokens in f32, a fifth of the Zen 4's L2. Planned steps with it
/// against steps without, in turns of 60 steps of each alternated step by step (Zen 4 VM,
/// bf16 and f32): at batch 1 ahead in 16 of 16 turns (slow phase; mostly by 0.7-1.5%, by
/// up to 10%), at batch 8 by 0.9-1.7% in 4 of 4, at batch 32 level (-0.3 to +0.8%). Asking
/// for each layer's K and V as its first product started as well (while the memory streams
/// weights anyway) was mixed at batch 1: -6.6% to +3.7%.
const WARM: usize = 192 << 10;

/// One sequence and KV head: the query heads `first_head..first_head + group`.
struct Job<'a> {
    shape: DecodeShape,
    ctx: &'a [i64],
    /// This job's share of the next sequence's slots (a third each for three KV heads),
    /// whose K and V rows it asks for (whole rows, into L2) evenly over its keys and values
    /// (`NextRows`). A sequence's rows are then in L2 when its jobs start, and a thread reads
    /// memory at an even pace instead of in bursts. Against the whole next sequence asked for
    /// by the second job's scores (`attention` example, 32 sequences of 192 tokens, AMX Xeon
    /// VM, three interleaved pairs): f32 13.6-14.2 → 11.9-12.3 ms, bf16 7.9-8.0 → 6.3-6.8 ms;
    /// whole bf16 batch-32 steps 30.5-31.9 → 29.7-30.3 ms, f32 ones within the noise.
    next: Option<&'a [i64]>,
    kv_head: usize,
    first_head: usize,
}

/// `q`, the pool's keys and values, and the output, as raw element pointers.
#[cfg(target_arch = "x86_64")]
type Ptrs = (*const u8, *const u8, *const u8, *mut u8);

#[cfg(target_arch = "x86_64")]
impl Job<'_> {
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run_avx512<const BF16: bool>(&self, ptrs: Ptrs, scores: &mut Vec<f32>) {
        self.run::<Avx512, BF16>(ptrs, scores)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2<const BF16: bool>(&self, ptrs: Ptrs, scores: &mut Vec<f32>) {
        self.run::<Avx2, BF16>(ptrs, scores)
    }

    /// The group's query heads up to three at a time, so that each K and V row read from the
    /// pool serves all of them (SmolLM2's groups are three heads).
    #[inline(always)]
    unsafe fn run<L: Lanes, const BF16: bool>(&self, ptrs: Ptrs, scores: &mut Vec<f32>) {
        let group = self.shape.num_heads / self.shape.num_kv_heads;
        let s = self.shape;
        let row = s.num_kv_heads * s.head_dim * if BF16 { 2 } else { 4 };
        let seen = s.window.map_or(self.ctx.len(), |w| self.ctx.len().min(w));
        let mut next = NextRows {
            slots: self.next.unwrap_or(&[]),
            pools: (ptrs.1, ptrs.2),
            row,
            // Every key is passed twice, once for its score and once for its value.
            ticks: 2 * seen.max(1),
            passed: 0,
            asked: 0,
        };
        let mut g = 0;
        while g < group {
            let head = self.first_head + g;
            g += match group - g {
                3.. => self.heads::<L, BF16, 3>(ptrs, head, scores, &mut next),
                2 => self.heads::<L, BF16, 2>(ptrs, head, scores, &mut next),
                _ => self.heads::<L, BF16, 1>(ptrs, head, scores, &mut next),
            };
        }
    }

    /// Query heads `first..first + G` of the group; returns `G`.
    // Indexes keep the register arrays' roles (head `h`, key `t`) readable.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn heads<L: Lanes, const BF16: bool, const G: usize>(
        &self,
        (q, k, v, out): Ptrs,
        first: usize,
        scores: &mut Vec<f32>,
        next: &mut NextRows,
    ) -> usize {
        let elt = if BF16 { 2 } else { 4 };
        let s = self.shape;
        let (hd, width) = (s.head_dim, L::WIDTH);
        let chunks = hd / width;
        let row = s.num_kv_heads * hd;
        let len = self.ctx.len();
        let start = s.window.map_or(0, |w| len.saturating_sub(w));
        let seen = &self.ctx[start..];
        let n = seen.len();
        // Head `h`'s scores are `scores[h * n..(h + 1) * n]`.
        scores.clear();
        scores.resize(G * n, 0.0);
        let qh = |h: usize, c: usize| q.add(((first + h) * hd + c * width) * elt);
        let key = |j: usize| k.add((seen[j] as usize * row + self.kv_head * hd) * elt);
        // Keys four at a time: 4 × G independent accumulators keep the FMA units busy (one
        // key's dot product alone is a chain of dependent FMAs).
        let mut j = 0;
        while j + 4 <= n {
            // Slots are scattered over the pool (one block of 16 at a time), so the hardware
            // prefetcher cannot guess the next keys: they are asked for `AHEAD` keys ahead,
            // whole rows (every KV head's part, see `AHEAD`).
            if j + AHEAD + 4 <= n {
                for t in AHEAD..AHEAD + 4 {
                    prefetch(k.add(seen[j + t] as usize * row * elt), row * elt);
                }
            }
            next.pass(4);
            let kr = [key(j), key(j + 1), key(j + 2), key(j + 3)];
            let mut acc = [[L::zero(); 4]; G];
            for c in 0..chunks {
                let mut qv = [L::zero(); G];
                for h in 0..G {
                    qv[h] = L::load::<BF16>(qh(h, c));
                }
                for t in 0..4 {
                    let kv = L::load::<BF16>(kr[t].add(c * width * elt));
                    for h in 0..G {
                        acc[h][t] = L::fmadd(qv[h], kv, acc[h][t]);
                    }
                }
            }
            for h in 0..G {
                scores[h * n + j..h * n + j + 4].copy_from_slice(&L::sum4(acc[h]));
            }
            j += 4;
        }
        while j < n {
            next.pass(1);
            let kr = key(j);
            let mut acc = [L::zero(); G];
            for c in 0..chunks {
                let kv = L::load::<BF16>(kr.add(c * width * elt));
                for h in 0..G {
                    acc[h] = L::fmadd(L::load::<BF16>(qh(h, c)), kv, acc[h]);
                }
            }
            for h in 0..G {
                scores[h * n + j] = L::sum(acc[h]);
            }
            j += 1;
        }
        let mut norms = [0f32; G];
        for h in 0..G {
            norms[h] = softmax::<L>(&mut scores[h * n..(h + 1) * n], s.scale, s.softcap);
        }
        // The values in blocks of up to 4 vectors of lanes per head, so that a block's G × 4
        // accumulators have a size known at compile time and stay in registers.
        let value = |j: usize| v.add((seen[j] as usize * row + self.kv_head * hd) * elt);
        let outs = |h: usize| out.add((first + h) * hd * elt);
        let mut c = 0;
        while c < chunks {
            let at = c * width * elt;
            let span = (self.kv_head * hd * elt, row * elt);
            let block = (&value, &scores[..], n, at, &norms[..], &outs, span);
            c += match chunks - c {
                4.. => weigh::<L, BF16, G, 4>(block, next),
                2 | 3 => weigh::<L, BF16, G, 2>(block, next),
                _ => weigh::<L, BF16, G, 1>(block, next),
            };
        }
        G
    }
}

/// Scales (and soft-caps) one head's scores and replaces them by `e^(score - max)`; returns
/// the normaliser `1 / Σ`. Vectorised with `Lanes::exp`: done one score at a time with libm's
/// `exp`, this was a third of the kernel's time at batch 32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn softmax<L: Lanes>(scores: &mut [f32], scale: f32, softcap: Option<f32>) -> f32 {
    let n = scores.len();
    let full = n / L::WIDTH * L::WIDTH;
    let p = scores.as_mut_ptr();
    let at = |i: usize| p.add(i) as *mut u8;
    let mut max = f32::NEG_INFINITY;
    if let Some(cap) = softcap {
        for i in 0..n {
            *p.add(i) = (*p.add(i) * scale / cap).tanh() * cap;
            max = max.max(*p.add(i));
        }
    } else {
        let (scale_v, mut top) = (L::splat(scale), L::splat(f32::NEG_INFINITY));
        let mut i = 0;
        while i < full {
            let v = L::mul(L::load::<false>(at(i)), scale_v);
            L::store::<false>(at(i), v);
            top = L::max(top, v);
            i += L::WIDTH;
        }
        if full > 0 {
            max = L::hmax(top);
        }
        for i in full..n {
            *p.add(i) *= scale;
            max = max.max(*p.add(i));
        }
    }
    let (max_v, mut total) = (L::splat(max), L::zero());
    let mut i = 0;
    while i < full {
        let e = L::exp(L::sub(L::load::<false>(at(i)), max_v));
        L::store::<false>(at(i), e);
        total = L::add(total, e);
        i += L::WIDTH;
    }
    let mut sum = L::sum(total);
    for i in full..n {
        *p.add(i) = (*p.add(i) - max).exp();
        sum += *p.add(i);
    }
    1.0 / sum
}

/// How many keys ahead K and V rows are prefetched. A job reads one KV head's part of each
/// slot's row (128 of SmolLM2's 384 bytes), and the jobs of a sequence's heads run one after
/// the other on a thread, so the prefetches ask for the whole row: the first head's job then
/// reads the rows from memory in order and the others find them in L2 (a sequence's context
/// per layer is 72 KB of keys at 192 tokens in bf16). With only the job's own part, 32 keys
/// ahead, decode attention read 141.6 MB of K/V in 13.0-13.5 ms per step at batch 32 (`attention`
/// example, Zen 4 VM, four interleaved pairs), 9.0-11.1 ms with whole rows 16 keys ahead;
/// 32 and 64 keys ahead were no better, and the first keys of a job prefetched up front no
/// different. The rows go to L2 (`prefetcht1`), where the first job finds them too: into L1,
/// six lines a key (twelve in f32) crowded out what the loop was reading. Four interleaved
/// pairs: f32 16.7-17.1 → 11.9-13.4 ms, bf16 7.5-8.3 → 7.2-7.6 ms; whole batch-32 f32 steps
/// 72.9-81.8 → 64.0-69.1 ms (three pairs).
const AHEAD: usize = 16;

/// The K and V rows a job asks for ahead of the next sequence's jobs (`Job::next`): as the
/// job passes its keys (`ticks` passes in all), it asks for as many of `slots` as have fallen
/// due, so that the last is asked for as it ends.
#[cfg(target_arch = "x86_64")]
struct NextRows<'a> {
    slots: &'a [i64],
    /// The key and value pools.
    pools: (*const u8, *const u8),
    /// Bytes of a slot's row (every KV head).
    row: usize,
    ticks: usize,
    passed: usize,
    asked: usize,
}

#[cfg(target_arch = "x86_64")]
impl NextRows<'_> {
    /// `keys` more keys passed: asks for the rows now due.
    #[inline(always)]
    unsafe fn pass(&mut self, keys: usize) {
        self.passed += keys;
        let due = (self.slots.len() * self.passed)
            .div_ceil(self.ticks)
            .min(self.slots.len());
        while self.asked < due {
            let at = self.slots[self.asked] as usize * self.row;
            prefetch(self.pools.0.add(at), self.row);
            prefetch(self.pools.1.add(at), self.row);
            self.asked += 1;
        }
    }
}

/// What `weigh` reads: the value rows by key, the G heads' scores (`n` each), the byte offset
/// of the block within a head, each head's softmax normaliser and output head, and how far
/// before a value the slot's whole row starts and its bytes (for the prefetches).
type Block<'a, V, O> = (
    &'a V,
    &'a [f32],
    usize,
    usize,
    &'a [f32],
    &'a O,
    (usize, usize),
);

/// `out(h)[at..N vectors] = norms[h] × Σ_j scores[h][j] × value(j)[at..]` for the G heads;
/// returns `N`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn weigh<L: Lanes, const BF16: bool, const G: usize, const N: usize>(
    (value, scores, n, at, norms, out, (back, whole_bytes)): Block<
        '_,
        impl Fn(usize) -> *const u8,
        impl Fn(usize) -> *mut u8,
    >,
    next: &mut NextRows,
) -> usize {
    let step = L::WIDTH * if BF16 { 2 } else { 4 };
    let mut acc = [[L::zero(); N]; G];
    for j in 0..n {
        if j + AHEAD < n {
            prefetch(value(j + AHEAD).wrapping_sub(back), whole_bytes);
        }
        next.pass(1);
        let row = value(j).add(at);
        let mut p = [L::zero(); G];
        for h in 0..G {
            p[h] = L::splat(scores[h * n + j]);
        }
        for c in 0..N {
            let vv = L::load::<BF16>(row.add(c * step));
            for h in 0..G {
                acc[h][c] = L::fmadd(p[h], vv, acc[h][c]);
            }
        }
    }
    for h in 0..G {
        let norm = L::splat(norms[h]);
        for c in 0..N {
            L::store::<BF16>(out(h).add(at + c * step), L::mul(acc[h][c], norm));
        }
    }
    N
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(shape: &[i64], step: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        ((Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * step).sin() * 2.0).view(shape)
    }

    /// The same attention with libtorch ops, in f64.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, ctx: &[&[i64]], s: DecodeShape) -> Tensor {
        let group = (s.num_heads / s.num_kv_heads) as i64;
        let rows: Vec<Tensor> = ctx
            .iter()
            .enumerate()
            .map(|(b, c)| {
                let start = s.window.map_or(0, |w| c.len().saturating_sub(w));
                let idx = Tensor::from_slice(&c[start..]);
                let kc = k
                    .index_select(0, &idx)
                    .to_kind(Kind::Double)
                    .transpose(0, 1);
                let vc = v
                    .index_select(0, &idx)
                    .to_kind(Kind::Double)
                    .transpose(0, 1);
                let kc = kc.repeat_interleave_self_int(group, 0, None);
                let vc = vc.repeat_interleave_self_int(group, 0, None);
                let qb = q.get(b as i64).to_kind(Kind::Double).unsqueeze(1);
                let mut sc = qb.matmul(&kc.transpose(1, 2)) * s.scale as f64;
                if let Some(cap) = s.softcap {
                    sc = (sc / cap as f64).tanh() * cap as f64;
                }
                sc.softmax(-1, Kind::Double).matmul(&vc).reshape([-1])
            })
            .collect();
        Tensor::stack(&rows, 0)
    }

    #[test]
    fn matches_libtorch_with_gqa_windows_and_softcap() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let Some(best) = isa(kind) else {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            };
            // The AVX2 build is checked on AVX-512 machines too.
            for isa in [best, Isa::Avx2] {
                for (nh, nkv, hd, softcap, window) in [
                    (9, 3, 64, None, None),
                    (4, 4, 32, Some(50.0), None),
                    (8, 2, 16, None, Some(5)),
                    (2, 1, 128, Some(3.0), Some(40)),
                ] {
                    let slots = 64;
                    let k = wave(&[slots, nkv, hd], 0.31).to_kind(kind);
                    let v = wave(&[slots, nkv, hd], 0.17).to_kind(kind);
                    let q = wave(&[3, nh, hd], 0.23).to_kind(kind);
                    let a: Vec<i64> = (0..17).map(|i| (i * 7) % slots).collect();
                    let b: Vec<i64> = vec![63];
                    let c: Vec<i64> = (10..60).collect();
                    let ctx: Vec<&[i64]> = vec![&a, &b, &c];
                    let shape = DecodeShape {
                        num_heads: nh as usize,
                        num_kv_heads: nkv as usize,
                        head_dim: hd as usize,
                        scale: 1.0 / (hd as f32).sqrt(),
                        softcap,
                        window,
                    };
                    let got =
                        decode_attention_on(isa, &q, &k, &v, &Contexts::new(&ctx), shape, &mut Now)
                            .expect("kernel");
                    let want = reference(&q, &k, &v, &ctx, shape);
                    let err = (got.to_kind(Kind::Double) - want)
                        .abs()
                        .max()
                        .double_value(&[]);
                    let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
                    assert!(err < tol, "{kind:?} {isa:?} {nh}/{nkv}x{hd}: error {err}");
                }
            }
        }
    }

    #[test]
    fn many_sequences_split_across_threads_equal_each_alone() {
        let Some(isa) = isa(Kind::Float) else {
            eprintln!("skipping: no kernel for this CPU");
            return;
        };
        let (slots, nh, nkv, hd) = (512, 9, 3, 64);
        let k = wave(&[slots, nkv, hd], 0.31);
        let v = wave(&[slots, nkv, hd], 0.17);
        let q = wave(&[40, nh, hd], 0.23);
        // 40 sequences of 20 to 137 positions: enough work to be split across threads.
        let ctx: Vec<Vec<i64>> = (0..40)
            .map(|b| (0..20 + 3 * b).map(|i| (i * 11 + b * 5) % slots).collect())
            .collect();
        let refs: Vec<&[i64]> = ctx.iter().map(|c| c.as_slice()).collect();
        let shape = DecodeShape {
            num_heads: nh as usize,
            num_kv_heads: nkv as usize,
            head_dim: hd as usize,
            scale: 0.125,
            softcap: None,
            window: None,
        };
        let all = decode_attention_on(isa, &q, &k, &v, &Contexts::new(&refs), shape, &mut Now)
            .expect("kernel");
        for (b, c) in refs.iter().enumerate() {
            let one = decode_attention_on(
                isa,
                &q.narrow(0, b as i64, 1),
                &k,
                &v,
                &Contexts::new(&[*c]),
                shape,
                &mut Now,
            )
            .expect("kernel");
            assert!(all.get(b as i64).equal(&one.get(0)), "sequence {b}");
        }
    }

    #[test]
    fn declines_bad_slots_and_odd_head_dims() {
        let k = wave(&[8, 1, 16], 0.1);
        let q = wave(&[1, 1, 16], 0.2);
        let shape = DecodeShape {
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 16,
            scale: 0.25,
            softcap: None,
            window: None,
        };
        assert!(
            decode_attention(&q, &k, &k, &[&[8]], shape).is_none(),
            "slot outside the pool"
        );
        assert!(
            decode_attention(&q, &k, &k, &[&[]], shape).is_none(),
            "empty context"
        );
        let k = wave(&[8, 1, 12], 0.1);
        let q = wave(&[1, 1, 12], 0.2);
        let odd = DecodeShape {
            head_dim: 12,
            ..shape
        };
        assert!(decode_attention(&q, &k, &k, &[&[1]], odd).is_none());
    }
}
