//! The model's SIMD kernels: the crate's one unsafe seam, each `unsafe` with a SAFETY line.
//!
//! Two kernels: a Q8_0 or a Q4_1 weight row against a batch of quantized activation rows,
//! for `q8`'s batched matmul. It is compiled for AVX2 and FMA, which the whole binary is built
//! with (`.cargo/config.toml`); builds without them have no kernel ([`AVAILABLE`] is false).

/// Values per Q8_0 block.
pub(crate) const BLOCK: usize = 32;
/// Bytes per Q8_0 block: an f16 scale, then 32 signed bytes.
pub(crate) const BLOCK_BYTES: usize = 34;
/// Bytes per Q4_1 block: an f16 scale, an f16 minimum, then 16 bytes of 4-bit values (the
/// block's first 16 in the low nibbles, its last 16 in the high ones).
pub(crate) const Q4_1_BLOCK_BYTES: usize = 20;
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

/// One Q4_1 weight row `w` against every activation row, as [`q8_row`]; `sums` holds, per
/// row and block, the activation block's scale times the sum of its values (rounded as
/// candle's and ggml's Q8_1 blocks round it), for the weights' minimum.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
pub(crate) fn q4_1_row(w: &[u8], values: &[i8], scales: &[f32], sums: &[f32], k: usize, out: &mut [f32]) {
    // SAFETY: as in `q8_row`.
    unsafe { kernel::row_q4_1(w, values, scales, sums, k, out) }
}

/// Builds without AVX2 and FMA have no kernel; `q8::matmul` never gets here on them.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
pub(crate) fn q8_row(_: &[u8], _: &[i8], _: &[f32], _: usize, out: &mut [f32]) {
    out.fill(f32::NAN);
}

/// See [`q8_row`]'s twin above.
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
pub(crate) fn q4_1_row(_: &[u8], _: &[i8], _: &[f32], _: &[f32], _: usize, out: &mut [f32]) {
    out.fill(f32::NAN);
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod kernel {
    use super::{BLOCK, BLOCK_BYTES, LANES, Q4_1_BLOCK_BYTES};
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

    /// How many activation rows from `first` (of `rows`) go side by side next.
    fn lanes_from(first: usize, rows: usize) -> usize {
        match rows - first {
            n if n >= LANES => LANES,
            n if n >= 4 => 4,
            n if n >= 2 => 2,
            _ => 1,
        }
    }

    /// One weight row (its Q8_0 blocks) against every activation row: `out[i]` is the dot
    /// product with row `i`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn row(w: &[u8], values: &[i8], scales: &[f32], k: usize, out: &mut [f32]) {
        let mut first = 0;
        while first < out.len() {
            let lanes = lanes_from(first, out.len());
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

    /// [`row`] for a Q4_1 weight row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn row_q4_1(w: &[u8], values: &[i8], scales: &[f32], sums: &[f32], k: usize, out: &mut [f32]) {
        let mut first = 0;
        while first < out.len() {
            let lanes = lanes_from(first, out.len());
            let out = &mut out[first..first + lanes];
            let a = Acts { values, scales, sums, k, first };
            match lanes {
                LANES => lanes_q4_1::<LANES>(w, &a, out),
                4 => lanes_q4_1::<4>(w, &a, out),
                2 => lanes_q4_1::<2>(w, &a, out),
                _ => lanes_q4_1::<1>(w, &a, out),
            }
            first += lanes;
        }
    }

    /// Quantized activation rows, from row `first` on.
    struct Acts<'a> {
        values: &'a [i8],
        scales: &'a [f32],
        sums: &'a [f32],
        k: usize,
        first: usize,
    }

    /// Activation rows side by side against one Q4_1 weight row: per block, the weights'
    /// nibbles are unpacked once, multiplied with each row's bytes as unsigned by signed
    /// (ggml's `vec_dot_q4_1_q8_1`: its values are 0..15, so no sign trick), scaled by both
    /// scales; the block minimum times the activation block's sum is added apart.
    #[target_feature(enable = "avx2,fma")]
    fn lanes_q4_1<const L: usize>(w: &[u8], a: &Acts<'_>, out: &mut [f32]) {
        let (k, blocks) = (a.k, a.k / BLOCK);
        let values: &[u8] = bytemuck::cast_slice(a.values);
        let rows: [(&[u8], &[f32], &[f32]); L] = core::array::from_fn(|l| {
            let r = a.first + l;
            let per_block = r * blocks..(r + 1) * blocks;
            (&values[r * k..(r + 1) * k], &a.scales[per_block.clone()], &a.sums[per_block])
        });
        let ones = _mm256_set1_epi16(1);
        let nibble = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); L];
        let mut mins = [0f32; L];
        for (b, wb) in w.chunks_exact(Q4_1_BLOCK_BYTES).take(blocks).enumerate() {
            let dw = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
            let mw = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
            let packed: __m128i = bytemuck::pod_read_unaligned(&wb[4..20]);
            // Values 0..15 are the low nibbles, 16..31 the high ones.
            let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed), nibble);
            for l in 0..L {
                let (v, sc, sm) = rows[l];
                let qa = load(&v[b * BLOCK..]);
                let q = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(qw, qa)));
                acc[l] = _mm256_fmadd_ps(_mm256_set1_ps(dw * sc[b]), q, acc[l]);
                mins[l] += mw * sm[b];
            }
        }
        for l in 0..L {
            out[l] = hsum(acc[l]) + mins[l];
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
