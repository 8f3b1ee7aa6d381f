//! Greedy token choice for rows that ask for nothing else: each row's argmax and its
//! log-probability, read straight out of the logits.
//!
//! libtorch's path for it (select the rows, widen to f32, `log_softmax`, `argmax`, `gather`)
//! took 4.7 ms for 32 rows of SmolLM2's 49,152 logits on the AMX Xeon VM, 2 threads: five
//! passes over 6 MB, and a whole log-softmax written to read one value a row. Here each row is
//! read three times, the last two from cache: its maximum, the first index that holds it (the
//! tie `argmax` breaks), and `Σ e^(x - max)`. The log-probability is then `-ln Σ`, which is what
//! libtorch's `log_softmax` computes for the maximum (`x - max - ln Σ`, with `x - max` exactly
//! 0); the sum differs from libtorch's only in rounding (2-ulp `exp`, another order of adds).
//! Rows are split across libtorch's threads. A row with a NaN or +inf, or only -inf, declines
//! the whole batch to libtorch, whose conventions for those stay the reference (-inf among
//! finite logits is an ordinary logit).

use tch::{Device, Kind, Tensor};

#[cfg(target_arch = "x86_64")]
use super::element::widen;
#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512, Lanes};
use super::{isa, Isa};

/// `(argmax, log-probability of it)` for each of `rows` of `logits` `[_, vocab]` (a CPU f32 or
/// bf16 tensor, contiguous), or `None` where the kernel does not apply.
pub fn greedy(logits: &Tensor, rows: &[usize]) -> Option<Vec<(i64, f32)>> {
    greedy_on(isa(logits.kind())?, logits, rows)
}

/// `greedy` with a chosen instruction set, which the caller has checked the CPU has.
fn greedy_on(isa: Isa, logits: &Tensor, rows: &[usize]) -> Option<Vec<(i64, f32)>> {
    let kind = logits.kind();
    let (height, vocab) = logits.size2().ok()?;
    let (height, vocab) = (usize::try_from(height).ok()?, usize::try_from(vocab).ok()?);
    if logits.device() != Device::Cpu
        || !matches!(kind, Kind::Float | Kind::BFloat16)
        || !logits.is_contiguous()
        || vocab == 0
        || rows.iter().any(|&r| r >= height)
    {
        return None;
    }
    let mut out = vec![(0i64, f32::NAN); rows.len()];
    #[cfg(target_arch = "x86_64")]
    {
        let (src, dst) = (logits.data_ptr() as usize, out.as_mut_ptr() as usize);
        let logits_elt = kind.elt_size_in_bytes();
        let run = move |part: std::ops::Range<usize>| {
            for i in part {
                // SAFETY: `logits` is a contiguous CPU `[height, vocab]` tensor of `kind`, alive
                // until `split` returns, and `rows[i] < height`; each `i` is one thread's alone,
                // and `out` holds `rows.len()` entries; the caller checked the CPU.
                unsafe {
                    let row = (src as *const u8).add(rows[i] * vocab * logits_elt);
                    let choice = match (isa, kind == Kind::BFloat16) {
                        (Isa::Avx512, false) => row_avx512::<false>(row, vocab),
                        (Isa::Avx512, true) => row_avx512::<true>(row, vocab),
                        (Isa::Avx2, false) => row_avx2::<false>(row, vocab),
                        (Isa::Avx2, true) => row_avx2::<true>(row, vocab),
                    };
                    *(dst as *mut (i64, f32)).add(i) = choice;
                }
            }
        };
        super::threads::split(rows.len(), 1, rows.len() * vocab >= 1 << 16, &run);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = isa;
        return None;
    }
    // A NaN or +inf in a row, or a row of -inf, makes its sum NaN: libtorch decides those.
    out.iter()
        .all(|&(_, logprob)| logprob.is_finite())
        .then_some(out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn row_avx512<const BF16: bool>(row: *const u8, vocab: usize) -> (i64, f32) {
    row_of::<Avx512, BF16>(row, vocab)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2<const BF16: bool>(row: *const u8, vocab: usize) -> (i64, f32) {
    row_of::<Avx2, BF16>(row, vocab)
}

/// # Safety
/// `row` must hold `vocab` elements of the dtype `BF16` names.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row_of<L: Lanes, const BF16: bool>(row: *const u8, vocab: usize) -> (i64, f32) {
    let elt = if BF16 { 2 } else { 4 };
    let get = |i: usize| {
        if BF16 {
            widen(*(row as *const u16).add(i))
        } else {
            *(row as *const f32).add(i)
        }
    };
    let full = vocab / L::WIDTH * L::WIDTH;
    let mut top = L::splat(f32::NEG_INFINITY);
    let mut i = 0;
    while i < full {
        top = L::max(top, L::load::<BF16>(row.add(i * elt)));
        i += L::WIDTH;
    }
    let mut max = L::hmax(top);
    for i in full..vocab {
        max = max.max(get(i));
    }
    // The first index holding the maximum, as `argmax` breaks ties; every row has one unless
    // it holds a NaN, which the sum below reports.
    let first = (0..vocab).find(|&i| get(i) == max).unwrap_or(0);
    let shift = L::splat(max);
    let mut total = L::zero();
    let mut i = 0;
    while i < full {
        let x = L::load::<BF16>(row.add(i * elt));
        total = L::add(total, L::exp(L::sub(x, shift)));
        i += L::WIDTH;
    }
    let mut sum = L::sum(total);
    for i in full..vocab {
        sum += (get(i) - max).exp();
    }
    (first as i64, -sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libtorch's answer: the rows selected, widened, `log_softmax`, `argmax`, `gather`.
    fn reference(logits: &Tensor, rows: &[usize]) -> Vec<(i64, f32)> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let logp = logits
            .index_select(0, &Tensor::from_slice(&idx))
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float);
        let best = logp.argmax(-1, false);
        let chosen = logp.gather(1, &best.unsqueeze(1), false).squeeze_dim(1);
        let best = Vec::<i64>::try_from(&best).expect("ids");
        let chosen = Vec::<f32>::try_from(&chosen).expect("logprobs");
        best.into_iter().zip(chosen).collect()
    }

    #[test]
    fn matches_libtorch_argmax_and_log_softmax() {
        for kind in [Kind::Float, Kind::BFloat16] {
            let Some(best) = isa(kind) else {
                eprintln!("skipping {kind:?}: no kernel for this CPU");
                continue;
            };
            for isa in [best, Isa::Avx2] {
                // A vocabulary with a tail of either width, and one below a vector; rows out
                // of order and repeated, as a batch's sampling rows can be.
                for (height, vocab) in [(6i64, 49_152i64), (5, 1_000), (3, 7)] {
                    let logits = ((Tensor::arange(height * vocab, (Kind::Float, Device::Cpu))
                        * 0.731)
                        .sin()
                        * 9.0)
                        .view([height, vocab])
                        .to_kind(kind);
                    let rows: Vec<usize> = [4usize, 0, 2, 2]
                        .iter()
                        .map(|&r| r % height as usize)
                        .collect();
                    let got = greedy_on(isa, &logits, &rows).expect("kernel");
                    let want = reference(&logits, &rows);
                    for ((g, w), r) in got.iter().zip(&want).zip(&rows) {
                        assert_eq!(g.0, w.0, "{kind:?} {isa:?} {vocab}: row {r}'s argmax");
                        assert!(
                            (g.1 - w.1).abs() <= 1e-5 * w.1.abs().max(1.0),
                            "{kind:?} {isa:?} {vocab}: row {r}'s logprob {} against {}",
                            g.1,
                            w.1
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_first_index() {
        let Some(isa) = isa(Kind::Float) else {
            return;
        };
        let mut values = vec![0.0f32; 100];
        for i in [17, 40, 99] {
            values[i] = 3.0;
        }
        let logits = Tensor::from_slice(&values).view([1, 100]);
        let got = greedy_on(isa, &logits, &[0]).expect("kernel");
        assert_eq!(got, reference(&logits, &[0]));
        assert_eq!(got[0].0, 17);
    }

    #[test]
    fn declines_nan_infinity_and_what_it_cannot_read() {
        let Some(isa) = isa(Kind::Float) else {
            return;
        };
        for bad in [f32::NAN, f32::INFINITY] {
            let mut values = vec![0.5f32; 64];
            values[33] = bad;
            let logits = Tensor::from_slice(&values).view([2, 32]);
            assert!(
                greedy_on(isa, &logits, &[0]).is_some(),
                "{bad}: row 0 is clean"
            );
            assert!(greedy_on(isa, &logits, &[1, 0]).is_none(), "{bad} in row 1");
        }
        // -inf is an ordinary logit (a token never to be picked), unless the whole row is.
        let mut values = vec![0.5f32; 64];
        values[3] = 1.5;
        values[33] = f32::NEG_INFINITY;
        values[40] = 2.0;
        let logits = Tensor::from_slice(&values).view([2, 32]);
        let got = greedy_on(isa, &logits, &[1, 0]).expect("-inf in a row");
        assert_eq!(got, reference(&logits, &[1, 0]));
        let logits = Tensor::full([1, 32], f64::NEG_INFINITY, (Kind::Float, Device::Cpu));
        assert!(greedy_on(isa, &logits, &[0]).is_none(), "a row of -inf");
        let logits = Tensor::zeros([2, 32], (Kind::Float, Device::Cpu));
        assert!(
            greedy_on(isa, &logits, &[2]).is_none(),
            "a row past the end"
        );
        assert!(
            greedy_on(isa, &logits.tr(), &[0]).is_none(),
            "not contiguous"
        );
        assert!(greedy(&logits.to_kind(Kind::Double), &[0]).is_none(), "f64");
    }
}
