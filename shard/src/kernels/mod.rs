//! CPU kernels for the decode step, where libtorch's general kernels lose to a plain stream.
//!
//! A decode step at small batch reads every weight once and a little KV cache per sequence:
//! it can only be as fast as memory. libtorch's CPU kernels reach about half of the machine's
//! read bandwidth on these shapes and pay fixed costs per op that dominate tiny tensors, so the
//! two hot spots have hand-written AVX-512 versions here: `matvec` (weights times a few rows)
//! and `attention` (one query token per sequence against its paged context). They run on the
//! calling thread, need AVX-512 (and AVX-512 BF16 for bf16), and every caller falls back to
//! libtorch when `supported` says no. `TESSERA_NO_KERNELS=1` turns them off, for comparison.

pub mod attention;
mod matvec;

pub use attention::decode_attention;
pub use matvec::{matvec, MAX_ROWS};

use tch::Kind;

pub(crate) fn supported(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let f32_ok = *F32.get_or_init(|| {
            std::env::var_os("TESSERA_NO_KERNELS").is_none() && is_x86_feature_detected!("avx512f")
        });
        match kind {
            Kind::Float => f32_ok,
            Kind::BFloat16 => {
                *BF16.get_or_init(|| f32_ok && is_x86_feature_detected!("avx512bf16"))
            }
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}
