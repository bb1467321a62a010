//! The model's SIMD kernels: the crate's one unsafe seam, each `unsafe` with a SAFETY line.
//!
//! One kernel today: a Q8_0 weight row against a batch of quantized activation rows, for
//! `q8`'s batched matmul. It is compiled for AVX2 and FMA, which the whole binary is built
//! with (`.cargo/config.toml`); builds without them have no kernel ([`AVAILABLE`] is false).

/// Values per Q8_0 block.
pub(crate) const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
pub(crate) const BLOCK_BYTES: usize = 34;
/// Sequences that accumulate side by side.
const LANES: usize = 8;

/// Whether this build has the kernels (x86-64 with AVX2 and FMA enabled at compile time).
pub(crate) const AVAILABLE: bool = cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"));

/// One weight row `w` (its Q8_0 blocks) against every activation row (`values`: `k` signed
/// bytes per row; `scales`: one per row and block): `out[i]` is the dot product with row `i`.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
pub(crate) fn q8_row(w: &[u8], values: &[i8], scales: &[f32], k: usize, out: &mut [f32]) {
    // SAFETY: the kernel needs AVX2 and FMA, and this build (the cfg above) enables both for
    // the whole binary, so any CPU that runs this code at all has them.
    unsafe { kernel::row(w, values, scales, k, out) }
}

/// Builds without AVX2 and FMA have no kernel; `q8::matmul` never gets here on them.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
pub(crate) fn q8_row(_: &[u8], _: &[i8], _: &[f32], _: usize, out: &mut [f32]) {
    out.fill(f32::NAN);
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod kernel {
    use super::{BLOCK, BLOCK_BYTES, LANES};
    use core::arch::x86_64::*;
    use half::f16;

    #[target_feature(enable = "avx2,fma")]
    fn load(b: &[u8]) -> __m256i {
        bytemuck::pod_read_unaligned(&b[..32])
    }

    /// candle's `hsum_float_8`, in its order.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// One weight row (its Q8_0 blocks) against every activation row: `out[i]` is the dot
    /// product with row `i`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn row(w: &[u8], values: &[i8], scales: &[f32], k: usize, out: &mut [f32]) {
        let mut first = 0;
        while first < out.len() {
            let lanes = match out.len() - first {
                n if n >= LANES => LANES,
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            let out = &mut out[first..first + lanes];
            match lanes {
                LANES => lanes_of::<LANES>(w, values, scales, k, first, out),
                4 => lanes_of::<4>(w, values, scales, k, first, out),
                2 => lanes_of::<2>(w, values, scales, k, first, out),
                _ => lanes_of::<1>(w, values, scales, k, first, out),
            }
            first += lanes;
        }
    }

    /// Activation rows `first..first + L` against one weight row, side by side (a constant
    /// `L` keeps the accumulators in registers).
    #[target_feature(enable = "avx2,fma")]
    fn lanes_of<const L: usize>(w: &[u8], values: &[i8], scales: &[f32], k: usize, first: usize, out: &mut [f32]) {
        let blocks = k / BLOCK;
        let values: &[u8] = bytemuck::cast_slice(values);
        let rows: [(&[u8], &[f32]); L] = core::array::from_fn(|l| {
            let r = first + l;
            (&values[r * k..(r + 1) * k], &scales[r * blocks..(r + 1) * blocks])
        });
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); L];
        for (b, wb) in w.chunks_exact(BLOCK_BYTES).take(blocks).enumerate() {
            let dw = _mm256_set1_ps(f16::from_le_bytes([wb[0], wb[1]]).to_f32());
            let bx = load(&wb[2..]);
            let ax = _mm256_sign_epi8(bx, bx);
            for l in 0..L {
                let (v, sc) = rows[l];
                let by = load(&v[b * BLOCK..]);
                let sy = _mm256_sign_epi8(by, bx);
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(ax, sy)));
                // The same product as candle's scalar one: IEEE multiplication is the same
                // in every lane.
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(sc[b]));
                acc[l] = _mm256_fmadd_ps(d, q, acc[l]);
            }
        }
        for l in 0..L {
            out[l] = hsum(acc[l]);
        }
    }
}
