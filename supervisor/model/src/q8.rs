//! A batched matmul on Q8_0 and Q4_1 weights, for decode steps of one or several sequences.
//!
//! candle's quantized matmul computes each (sequence, weight row) dot product on its own, so a
//! step of `b` sequences costs `b` times one step: on this kind of host a 16-sequence step was
//! slower than candle's f32 GEMM on dequantized weights, and both were far from the 16 single
//! steps' cost divided by the batch. Here each weight block is loaded, and its absolute value
//! taken, once for every sequence in the batch, and up to eight sequences accumulate side by side, so
//! the loop is bound by the integer multiply-adds alone.
//!
//! For Q8_0 the arithmetic is candle's, step for step (its AVX2 `vec_dot_q8_0_q8_0`: the
//! same activation quantization, the same sign trick and pair sums, one fused multiply-add
//! per block into one accumulator, the same horizontal sum), so results are candle's bit for
//! bit. For Q4_1 (ggml's `vec_dot_q4_1_q8_1`, which candle runs as a scalar loop) the integer
//! sums are the same and the float adds are in another order: equal within rounding. Either
//! way a row's result does not depend on the rows beside it, so a batched step's logits are
//! bit-equal to single steps'. The weights are read in place from candle's storage.
//!
//! Written here rather than taken from a crate: none of candle, gemm or the SIMD crates has an
//! integer matmul over GGUF blocks. The kernel is compiled for AVX2 and FMA, which the whole
//! binary is built with (`.cargo/config.toml`), and lives in `simd`, the crate's one unsafe
//! module; builds without them have no kernel ([`available`] is false) and callers keep
//! candle's.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;
use half::f16;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::simd::{self, BLOCK, BLOCK_BYTES, Q4_1_BLOCK_BYTES};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 32;
/// Activation rows that meet all of a task's weight rows before the next ones.
const ACT_ROWS: usize = 16;

/// Whether this build has the kernel (x86-64 with AVX2 and FMA enabled at compile time).
pub const fn available() -> bool {
    simd::AVAILABLE
}

/// Activation rows quantized to Q8_0 as candle quantizes them: per block, the scale is the
/// largest magnitude over 127, kept as f16, and each value is rounded by the f32 scale.
struct Quantized {
    /// Per row and block, the f16 scale widened to f32.
    scales: Vec<f32>,
    /// Per row, `k` signed bytes.
    values: Vec<i8>,
    /// Per row and block, the scale times the sum of the block's values, as a Q8_1 block
    /// keeps it (f16 by f16, rounded to f16): what a Q4_1 block's minimum multiplies.
    sums: Vec<f32>,
}

fn quantize(x: &[f32], k: usize) -> Quantized {
    let blocks = x.len() / BLOCK;
    let mut scales = Vec::with_capacity(blocks);
    let mut values = Vec::with_capacity(x.len());
    let mut sums = Vec::with_capacity(blocks);
    debug_assert_eq!(x.len() % k, 0);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d16 = f16::from_f32(d);
        scales.push(d16.to_f32());
        let start = values.len();
        values.extend(block.iter().map(|v| (v * id).round() as i8));
        let sum: i32 = values[start..].iter().map(|v| i32::from(*v)).sum();
        sums.push((f16::from_f32(sum as f32) * d16).to_f32());
    }
    Quantized { scales, values, sums }
}

/// Whether [`matmul`] takes weights of type `t`.
pub fn takes(t: GgmlDType) -> bool {
    available() && matches!(t, GgmlDType::Q8_0 | GgmlDType::Q4_1)
}

/// `x` (`m` rows of `k`) times the transpose of `w` (`n` rows of `k`, Q8_0 or Q4_1): `m` rows
/// of `n`. `None` when `w` is of another type or this build has no kernel.
pub fn matmul(w: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let &[n, k] = w.shape().dims() else { return Ok(None) };
    if !takes(w.dtype()) || k % BLOCK != 0 || m == 0 {
        return Ok(None);
    }
    if x.len() != m * k {
        candle_core::bail!("q8 matmul: {} inputs for {m} rows of {k}", x.len());
    }
    let q4_1 = w.dtype() == GgmlDType::Q4_1;
    let row_bytes = (k / BLOCK) * if q4_1 { Q4_1_BLOCK_BYTES } else { BLOCK_BYTES };
    let bytes = w.data()?;
    if bytes.len() != n * row_bytes {
        candle_core::bail!("q8 matmul: {} bytes of weights for {n} rows of {k}", bytes.len());
    }
    let acts = quantize(x, k);
    // In parallel tasks of whole weight rows, so every output is written once; atomics make
    // that sharing safe at the cost of plain stores.
    let y: Vec<AtomicU32> = (0..m * n).map(|_| AtomicU32::new(0)).collect();
    crate::pool::each(n.div_ceil(ROWS_PER_TASK), |task| {
        weight_rows(&bytes, &acts, (m, k, n), (row_bytes, q4_1), task, &y);
        Ok(())
    })?;
    let y = y.into_iter().map(|v| f32::from_bits(v.into_inner())).collect();
    Ok(Some(y))
}

/// The weight rows of parallel task `task`, into `y` (`m` rows of `n`).
fn weight_rows(
    bytes: &[u8],
    acts: &Quantized,
    (m, k, n): (usize, usize, usize),
    (row_bytes, q4_1): (usize, bool),
    task: usize,
    y: &[AtomicU32],
) {
    let mut out = vec![0f32; ROWS_PER_TASK * m];
    let rows = task * ROWS_PER_TASK..n.min((task + 1) * ROWS_PER_TASK);
    let blocks = k / BLOCK;
    // Activation rows a slice at a time, each against all the task's weight rows: the slice
    // and the weight rows stay in the L1 cache together, where a prefill's whole activation
    // matrix, streamed once per weight row, came from L2.
    for first in (0..m).step_by(ACT_ROWS) {
        let len = ACT_ROWS.min(m - first);
        let values = &acts.values[first * k..(first + len) * k];
        let scales = &acts.scales[first * blocks..(first + len) * blocks];
        for (j, out) in rows.clone().zip(out.chunks_exact_mut(m)) {
            let w = &bytes[j * row_bytes..(j + 1) * row_bytes];
            let out = &mut out[first..first + len];
            if q4_1 {
                let sums = &acts.sums[first * blocks..(first + len) * blocks];
                simd::q4_1_row(w, values, scales, sums, k, out);
            } else {
                simd::q8_row(w, values, scales, k, out);
            }
        }
    }
    // Stored sequence by sequence, so that each store run is contiguous.
    for (i, y) in y.chunks_exact(n).enumerate() {
        for (r, j) in rows.clone().enumerate() {
            y[j].store(out[r * m + i].to_bits(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values in [-1, 1) with a few large ones, so block scales differ.
    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let v = (s % 20_000) as f32 / 10_000.0 - 1.0;
                if i % 37 == 0 {
                    v * 9.0
                } else {
                    v
                }
            })
            .collect()
    }

    /// Every row of a batch gets, bit for bit, what candle's quantized matmul gives that row
    /// alone, for batch sizes below, at and above the side-by-side lanes.
    #[test]
    fn batched_rows_equal_candles_single_rows_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, k) = (70, 96);
        let w = Tensor::from_vec(values(n * k, 1), (n, k), &dev).expect("weights");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize")).expect("qmatmul");
        for m in [1usize, 2, 4, 5, 9, 16] {
            let x = values(m * k, 7 + m as u32);
            let Some(got) = super::matmul(&q, &x, m).expect("matmul") else {
                assert!(!super::available(), "Q8_0 weights with a kernel give a result");
                return;
            };
            assert_eq!(got.len(), m * n);
            for i in 0..m {
                let row = Tensor::from_slice(&x[i * k..(i + 1) * k], (1, k), &dev).expect("row");
                let want: Vec<f32> =
                    candle.forward(&row).expect("forward").flatten_all().expect("flat").to_vec1().expect("vec");
                let have = &got[i * n..(i + 1) * n];
                for (j, (a, b)) in have.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "batch of {m}, row {i}, column {j}: {a} against {b}");
                }
            }
        }
    }

    /// Q4_1 weights, used as they are: every row of a batch within float rounding of what
    /// candle's own Q4_1 matmul gives that row alone (the integer sums are the same; the
    /// order of the float adds is not), and each row the same bits whatever the batch.
    #[test]
    fn q4_1_rows_match_candles_within_rounding_and_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        // An even number of blocks: candle's Q4_1 dot product asserts it (in debug builds).
        let (n, k) = (70, 128);
        let w = Tensor::from_vec(values(n * k, 2), (n, k), &dev).expect("weights");
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
        let candle = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize")).expect("qmatmul");
        let x16 = values(16 * k, 11);
        let Some(all) = super::matmul(&q, &x16, 16).expect("matmul") else {
            assert!(!super::available(), "Q4_1 weights with a kernel give a result");
            return;
        };
        for m in [1usize, 2, 5, 9, 16] {
            let got = super::matmul(&q, &x16[..m * k], m).expect("matmul").expect("a result");
            for i in 0..m {
                let row = Tensor::from_slice(&x16[i * k..(i + 1) * k], (1, k), &dev).expect("row");
                let want: Vec<f32> =
                    candle.forward(&row).expect("forward").flatten_all().expect("flat").to_vec1().expect("vec");
                let have = &got[i * n..(i + 1) * n];
                for (j, (a, b)) in have.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "batch of {m}, row {i}, column {j}: {a} against {b}"
                    );
                    assert_eq!(a.to_bits(), all[i * n + j].to_bits(), "row {i} differs in a batch of {m} and of 16");
                }
            }
        }
    }

    /// Weights of other types, and inputs of the wrong size, are not taken.
    #[test]
    fn other_weight_types_and_bad_inputs_are_refused() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(values(64 * 64, 3), (64, 64), &dev).expect("weights");
        let q4 = QTensor::quantize(&w, GgmlDType::Q4_0).expect("quantize");
        assert!(super::matmul(&q4, &values(128, 4), 2).expect("q4").is_none());
        let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
        if super::available() {
            assert!(super::matmul(&q8, &values(100, 4), 2).is_err(), "100 inputs are not 2 rows of 64");
        }
    }
}
