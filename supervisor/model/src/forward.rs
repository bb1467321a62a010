//! Our llama forward pass. Feeds of several tokens (prefill) run on candle's tensors and
//! kernels; decode steps ([`Model::decode_batch`], and a feed of one token) on plain rows,
//! with [`q8`]'s matmul and our attention over the cache, since the dispatch of candle's
//! small ops between the matrices cost more than their arithmetic. Why not candle's own
//! (`quantized_llama`), which this follows layer for layer:
//! - **Two copies of the weights.** Decoding one token is bound by memory bandwidth, where the
//!   quantized weights win; a prefill is bound by arithmetic, where candle's f32 GEMM is about
//!   4x faster than its quantized kernels. Feeds of more than [`PREFILL_ROWS`] tokens use
//!   f32 weights (dequantized at load; `AGENTD_PREFILL_WEIGHTS=quantized` skips them and
//!   saves their memory), single tokens the quantized ones.
//! - **A KV cache that is written in place.** candle's concatenates the whole cache for every
//!   token and copies keys and values once per query head (grouped-query attention); at 700
//!   tokens of context that was about 40% of the decode time. Here the cache grows by
//!   doubling, each token is written once, and the query heads of a group attend to their
//!   shared keys and values through a reshape, with no copies.
//! - **Rewinding** to an earlier position is free, since the cache holds positions in order.

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Storage, Tensor, D};
use candle_transformers::quantized_nn::RmsNorm;
use std::sync::{Arc, Mutex};

use crate::q8;

/// Feeds longer than this many tokens use the f32 weights.
pub const PREFILL_ROWS: usize = 8;

/// One projection, quantized and (optionally) dequantized.
struct Dual {
    quantized: QMatMul,
    dense: Option<QMatMul>,
}

/// candle has AVX2 kernels for Q4_0, Q8_0 and the k-quants, and a scalar loop for Q4_1,
/// Q5_0 and Q5_1 (80% of decode time on SmolLM2's Q4_1). Q4_1 goes through [`q8`]'s own
/// kernel as stored (20 bytes a block, against 34 requantized: decoding reads every weight
/// once a token, so bytes are time); Q5_0 and Q5_1 are requantized to Q8_0 at load (8 bits
/// per weight against their 5, so rounding adds at most 1/254 of a block's largest weight).
/// Builds without [`q8`]'s kernel requantize Q4_1 too.
fn with_fast_kernel(t: QTensor) -> Result<QTensor> {
    Ok(requantized(&t)?.unwrap_or(t))
}

/// `t` requantized to Q8_0, if [`with_fast_kernel`] does that to its type. Rows at a time,
/// so that no f32 copy of the whole matrix is ever held (a vocabulary's embeddings would
/// take 113 MB for SmolLM2): each block is quantized on its own, so the result is the same.
fn requantized(t: &QTensor) -> Result<Option<QTensor>> {
    /// Rows requantized at a time.
    const ROWS: usize = 256;
    let dev = &Device::Cpu;
    let (dtype, dims) = (t.dtype(), t.shape().dims().to_vec());
    let Some(&k) = dims.last().filter(|_| requantizes(dtype, dims.last().copied())) else { return Ok(None) };
    let rows = t.shape().elem_count() / k;
    let data = t.data()?;
    let row_bytes = data.len() / rows.max(1);
    let mut out = Vec::with_capacity(rows * k / 32 * 34);
    for (i, chunk) in data.chunks(ROWS * row_bytes).enumerate() {
        let n = chunk.len() / row_bytes;
        let part = qtensor_from_ggml(dtype, chunk, vec![n, k], dev)?.dequantize(dev)?;
        out.extend_from_slice(&QTensor::quantize(&part, GgmlDType::Q8_0)?.data()?);
        debug_assert!(out.len() == (i * ROWS + n) * k / 32 * 34);
    }
    qtensor_from_ggml(GgmlDType::Q8_0, &out, dims, dev).map(Some)
}

impl Dual {
    /// `t`, and its f32 copy if `dense` (made before any requantization).
    fn new(t: QTensor, dense: bool) -> Result<Self> {
        let d = if dense { Some(t.dequantize(&Device::Cpu)?) } else { None };
        Self::with_dense(with_fast_kernel(t)?, d)
    }

    fn with_dense(quantized: QTensor, dense: Option<Tensor>) -> Result<Self> {
        Ok(Self { quantized: QMatMul::from_qtensor(quantized)?, dense: dense.map(QMatMul::Tensor) })
    }

    fn forward(&self, x: &Tensor, rows: usize) -> Result<Tensor> {
        match &self.dense {
            Some(d) if rows > PREFILL_ROWS => d.forward(x),
            // Without f32 copies, a prefill goes through [`q8`] too, which reads each weight
            // block once for eight rows.
            _ => match q8_forward(&self.quantized, x)? {
                Some(y) => Ok(y),
                None => self.quantized.forward(x),
            },
        }
    }

    /// `m` plain rows of one decode step's sequences (see [`Model::decode_batch`]). Q8_0
    /// and Q4_1 weights go through [`q8`], which reads each weight block once for the whole
    /// batch (and, for one sequence, makes fewer passes through candle's pool than candle's
    /// own matmul). Other types through candle, whose quantized matmul costs `m` times one
    /// row; from [`DENSE_BATCH`] rows its f32 GEMM on the f32 copy is cheaper.
    fn rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if let Some(y) = q8_rows(&self.quantized, x, m)? {
            return Ok(y);
        }
        let k = x.len() / m.max(1);
        let xt = Tensor::from_slice(x, (1, m, k), &Device::Cpu)?;
        let y = match &self.dense {
            Some(d) if m >= DENSE_BATCH => d.forward(&xt)?,
            _ => self.quantized.forward(&xt)?,
        };
        y.flatten_all()?.to_vec1()
    }
}

/// Decode batches of at least this many sequences use the f32 weights, where [`q8`] does
/// not apply.
pub const DENSE_BATCH: usize = 8;

/// `x` (`(.., k)`) through quantized weights with [`q8::matmul`], if it applies to them.
fn q8_forward(w: &QMatMul, x: &Tensor) -> Result<Option<Tensor>> {
    let QMatMul::QTensor(t) = w else { return Ok(None) };
    if !q8::takes(t.dtype()) {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    let (Some(k), Some(&n)) = (dims.last().copied(), t.shape().dims().first()) else { return Ok(None) };
    let m = x.elem_count() / k.max(1);
    let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let Some(y) = q8::matmul(t, &xs, m)? else { return Ok(None) };
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Tensor::from_vec(y, dims, &Device::Cpu).map(Some)
}

/// A dot product the compiler vectorizes: sixteen independent sums (so that the adds do not
/// wait on each other), folded in halves at the end rather than added up one by one.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, ta) = a.as_chunks::<16>();
    let (cb, tb) = b.as_chunks::<16>();
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; 16];
    for (x, y) in ca.iter().zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let v8: [f32; 8] = std::array::from_fn(|j| acc[j] + acc[j + 8]);
    let v4: [f32; 4] = std::array::from_fn(|j| v8[j] + v8[j + 4]);
    let v2: [f32; 2] = std::array::from_fn(|j| v4[j] + v4[j + 2]);
    v2[0] + v2[1] + tail
}

/// Projections of the same input, fused into one matmul when their weights share a type
/// (fewer, larger matmuls: the input is quantized once, and a prefill's GEMMs are bigger).
struct Group {
    duals: Vec<Dual>,
    /// Output width of each projection.
    widths: Vec<usize>,
}

impl Group {
    fn new(parts: Vec<QTensor>, dense: bool) -> Result<Self> {
        let dense_parts = if dense {
            Some(parts.iter().map(|t| t.dequantize(&Device::Cpu)).collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        let parts = parts.into_iter().map(with_fast_kernel).collect::<Result<Vec<_>>>()?;
        let widths: Vec<usize> = parts.iter().map(|t| t.shape().dims()[0]).collect();
        let cols = parts[0].shape().dims().get(1).copied();
        let same = parts.iter().all(|t| t.dtype() == parts[0].dtype() && t.shape().dims().get(1).copied() == cols);
        let Some(cols) = cols.filter(|_| same && parts.len() > 1) else {
            let mut dense_parts = dense_parts.map(Vec::into_iter);
            let duals = parts
                .into_iter()
                .map(|t| Dual::with_dense(t, dense_parts.as_mut().and_then(Iterator::next)))
                .collect::<Result<_>>()?;
            return Ok(Self { duals, widths });
        };
        // Rows are whole blocks, so stacking matrices is concatenating their bytes.
        let mut bytes = Vec::new();
        for t in &parts {
            bytes.extend_from_slice(&t.data()?);
        }
        let rows = widths.iter().sum();
        let fused = qtensor_from_ggml(parts[0].dtype(), &bytes, vec![rows, cols], &Device::Cpu)?;
        let dense = dense_parts.map(|d| Tensor::cat(&d, 0)).transpose()?;
        Ok(Self { duals: vec![Dual::with_dense(fused, dense)?], widths })
    }

    fn forward(&self, x: &Tensor, rows: usize) -> Result<Vec<Tensor>> {
        self.apply(x, |d, x| d.forward(x, rows))
    }

    /// All projections of `m` input rows: `m` rows of every output side by side (the fused
    /// matrix's layout).
    fn rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if let [fused] = self.duals.as_slice() {
            return fused.rows(x, m);
        }
        let parts = self.duals.iter().map(|d| d.rows(x, m)).collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(m * self.widths.iter().sum::<usize>());
        for i in 0..m {
            for (p, w) in parts.iter().zip(&self.widths) {
                out.extend_from_slice(&p[i * w..(i + 1) * w]);
            }
        }
        Ok(out)
    }

    fn apply(&self, x: &Tensor, f: impl Fn(&Dual, &Tensor) -> Result<Tensor>) -> Result<Vec<Tensor>> {
        if let [fused] = self.duals.as_slice() {
            let y = f(fused, x)?;
            let mut at = 0;
            return self
                .widths
                .iter()
                .map(|w| {
                    at += w;
                    y.narrow(D::Minus1, at - w, *w)
                })
                .collect();
        }
        self.duals.iter().map(|d| f(d, x)).collect()
    }
}

struct Layer {
    /// Query, key and value.
    qkv: Group,
    wo: Dual,
    /// Gate and up.
    gate_up: Group,
    down: Dual,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    /// The two norms' weights, for decode steps.
    attn_norm_w: Vec<f32>,
    ffn_norm_w: Vec<f32>,
}

/// One conversation's keys and values: per layer, `(kv_heads, capacity, head_dim)` each.
/// It lives apart from the model, so that one model serves many conversations, and a
/// cache can be set aside, dropped or moved while its agent waits on a tool.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Positions it can hold before it grows.
    capacity: usize,
}

impl KvCache {
    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|(k, v)| (k.elem_count() + v.elem_count()) * 4).sum()
    }

    /// Drops it (and its memory).
    pub fn clear(&mut self) {
        self.layers.clear();
        self.capacity = 0;
    }

    /// Writes its first `len` positions to `path` (safetensors).
    pub fn save(&self, len: usize, path: &std::path::Path) -> Result<()> {
        let mut map = std::collections::HashMap::new();
        for (i, (k, v)) in self.layers.iter().enumerate() {
            map.insert(format!("k{i}"), k.narrow(1, 0, len)?.contiguous()?);
            map.insert(format!("v{i}"), v.narrow(1, 0, len)?.contiguous()?);
        }
        candle_core::safetensors::save(&map, path)
    }

    /// Reads a cache [`KvCache::save`] wrote.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let mut map = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut layers = Vec::new();
        while let (Some(k), Some(v)) =
            (map.remove(&format!("k{}", layers.len())), map.remove(&format!("v{}", layers.len())))
        {
            layers.push((k, v));
        }
        let capacity = layers.first().map_or(Ok(0), |(k, _)| k.dim(1))?;
        Ok(Self { layers, capacity })
    }
}

/// One sequence of a batched decode step: its cache, its next token and that token's position.
#[derive(Debug)]
pub struct Step<'a> {
    /// The sequence's cache.
    pub cache: &'a mut KvCache,
    /// The token to feed.
    pub token: u32,
    /// Its position.
    pub pos: usize,
}

/// A llama-family model. Its weights are read-only: every method takes `&self` and a
/// conversation's [`KvCache`].
pub struct Model {
    /// The token embeddings as the GGUF has them (quantized): rows are dequantized as tokens
    /// come, since an f32 copy of the whole table (113 MB for SmolLM2's 49,152 tokens, 500 MB
    /// for a 7B llama's 32,000) is read one row per token.
    embed: Arc<QTensor>,
    vocab: usize,
    dim: usize,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    /// What decode steps read besides the matrices, as plain vectors.
    plain: Plain,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    neox: bool,
    /// Longest context.
    pub max_context: usize,
}

/// The final norm's weights, the norms' epsilon and the rotary tables, for decode steps.
struct Plain {
    norm_w: Vec<f32>,
    eps: f32,
    /// `(max_context, half)`: as `Model::cos` and `Model::sin`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    match ct.metadata.get(key) {
        Some(v) => Ok(v.to_u32()? as usize),
        None => candle_core::bail!("the GGUF has no {key}"),
    }
}

fn meta_f32(ct: &gguf_file::Content, key: &str, default: f32) -> f32 {
    ct.metadata.get(key).and_then(|v| v.to_f32().ok()).unwrap_or(default)
}

/// The layer matrices: quantized for decode, and with f32 copies for prefill when asked.
const MATRICES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// What a model will take in memory, from its GGUF's tensor list, before anything is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryNeed {
    /// Weights as held: quantized as in the file, requantized where [`with_fast_kernel`] does
    /// it, f32 where candle dequantizes (F32, F16 and BF16 matrices), and the norms as f32.
    pub weights: u64,
    /// The f32 copies of the layer matrices, for prefill.
    pub dense: u64,
    /// One conversation's KV cache at the full context (with the moment it grows to it), and
    /// the rotary tables.
    pub kv: u64,
    /// The most held at once while loading besides the above, without the f32 copies...
    pub transient: u64,
    /// ...and with them.
    pub transient_dense: u64,
}

impl MemoryNeed {
    /// The whole, with or without the f32 copies.
    pub fn total(&self, dense: bool) -> u64 {
        let extra = if dense { self.dense.saturating_add(self.transient_dense) } else { self.transient };
        self.weights.saturating_add(self.kv).saturating_add(extra)
    }
}

/// Bytes of `elems` values of type `t` as the GGUF stores them.
fn stored_bytes(t: GgmlDType, elems: usize) -> u64 {
    (elems / t.block_size().max(1)) as u64 * t.type_size() as u64
}

/// Whether [`with_fast_kernel`] requantizes a matrix of type `t` with rows of `k`.
fn requantizes(t: GgmlDType, k: Option<usize>) -> bool {
    let direct = t == GgmlDType::Q4_1 && q8::available();
    !direct
        && matches!(t, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
        && k.is_some_and(|k| k % 32 == 0 && k > 0)
}

/// What [`Model::load`] will hold for the GGUF `ct` with a context of `max_context`.
pub fn memory_need(ct: &gguf_file::Content, max_context: usize) -> Result<MemoryNeed> {
    let (heads, kv_heads, blocks) = (
        meta_u32(ct, "llama.attention.head_count")?,
        meta_u32(ct, "llama.attention.head_count_kv")?,
        meta_u32(ct, "llama.block_count")?,
    );
    let dim = meta_u32(ct, "llama.embedding_length")?;
    let head_dim = dim / heads.max(1);
    // A tensor as read (raw bytes, then a copy as a tensor), as stored and as held after load.
    let f32_of = |elems: usize| elems as u64 * 4;
    let sizes = |info: &gguf_file::TensorInfo| {
        let elems = info.shape.elem_count();
        let stored = stored_bytes(info.ggml_dtype, elems);
        let held = if requantizes(info.ggml_dtype, info.shape.dims().last().copied()) {
            stored_bytes(GgmlDType::Q8_0, elems)
        } else if matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            f32_of(elems)
        } else {
            stored
        };
        (stored, held, f32_of(elems))
    };
    let mut need = MemoryNeed::default();
    let mut peak = |quantized: u64, dense: u64| {
        need.transient = need.transient.max(quantized);
        need.transient_dense = need.transient_dense.max(quantized.saturating_add(dense));
    };
    let tied = !ct.tensor_infos.contains_key("output.weight");
    let (mut weights, mut dense) = (0u64, 0u64);
    for (name, info) in &ct.tensor_infos {
        let (stored, held, f32s) = sizes(info);
        peak(stored.saturating_mul(2), 0);
        if name == "token_embd.weight" {
            // Kept as stored; a tied output is its requantized copy (built a few rows at a
            // time, then copied into a tensor), or candle's f32 copy of an unquantized one.
            weights += stored;
            if tied && held != stored {
                weights += held;
                peak(held.saturating_mul(2), 0);
            }
        } else if info.shape.dims().len() == 1 {
            // Norms: as candle's f32 tensors and as plain f32 vectors.
            weights += f32s.saturating_mul(2);
        } else if let Some(group) = group_of(name) {
            // A layer matrix: with its f32 copy for prefill.
            weights += held;
            dense += f32s;
            // Singles: the stored tensor while it is requantized (the result built, then
            // copied). Groups are counted whole below.
            if group.is_empty() {
                peak(stored.saturating_add(held.saturating_mul(2)), 0);
            }
        } else {
            weights += held;
            peak(stored.saturating_add(held.saturating_mul(2)), 0);
        }
    }
    // Fused groups: their parts, the bytes stacked and the fused tensor at once; with f32
    // copies, the parts' copies too (their concatenation is the kept copy).
    for i in 0..blocks {
        for group in [&["attn_q", "attn_k", "attn_v"][..], &["ffn_gate", "ffn_up"][..]] {
            let (mut held, mut f32s) = (0u64, 0u64);
            for part in group {
                if let Some(info) = ct.tensor_infos.get(&format!("blk.{i}.{part}.weight")) {
                    let (_, h, f) = sizes(info);
                    held += h;
                    f32s += f;
                }
            }
            peak(held.saturating_mul(3), f32s);
        }
    }
    need.weights = weights;
    need.dense = dense;
    // Keys and values in f32 for every layer and position, and, as the cache grows to its
    // full size, the old one beside it (at most half: see `Model::reserve`); and the rotary
    // tables (as vectors and as tensors).
    let cache = (blocks as u64)
        .saturating_mul(max_context as u64)
        .saturating_mul((kv_heads * head_dim) as u64)
        .saturating_mul(2 * 4);
    need.kv = cache.saturating_add(cache / 2).saturating_add((max_context * head_dim * 4 * 2) as u64);
    Ok(need)
}

/// The fused group a layer matrix belongs to: its parts' names, or none for a matrix of its
/// own; `None` for a tensor that is not a layer matrix.
fn group_of(name: &str) -> Option<&'static [&'static str]> {
    let m = MATRICES.iter().find(|m| name.starts_with("blk.") && name.ends_with(&format!(".{m}.weight")))?;
    Some(match *m {
        "attn_q" | "attn_k" | "attn_v" => &["attn_q", "attn_k", "attn_v"],
        "ffn_gate" | "ffn_up" => &["ffn_gate", "ffn_up"],
        _ => &[],
    })
}

impl Model {
    /// Loads the weights of a llama GGUF; `max_context` bounds the rotary tables and cache.
    /// With `dense`, the layer matrices also get f32 copies, for prefill (see [`MemoryNeed`]).
    pub fn load<R: std::io::Read + std::io::Seek>(
        ct: &gguf_file::Content,
        r: &mut R,
        max_context: usize,
        dense: bool,
    ) -> Result<Self> {
        let dev = &Device::Cpu;
        if meta_u32(ct, "llama.expert_count").unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts llama models are not supported");
        }
        let heads = meta_u32(ct, "llama.attention.head_count")?;
        let kv_heads = meta_u32(ct, "llama.attention.head_count_kv")?;
        let blocks = meta_u32(ct, "llama.block_count")?;
        let dim = meta_u32(ct, "llama.embedding_length")?;
        let rope_dim = meta_u32(ct, "llama.rope.dimension_count").unwrap_or(dim / heads);
        let eps = f64::from(meta_f32(ct, "llama.attention.layer_norm_rms_epsilon", 1e-5));
        let base = meta_f32(ct, "llama.rope.freq_base", 10_000.0);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || dim % heads != 0 || rope_dim != dim / heads {
            candle_core::bail!("unsupported attention shape: {heads} heads, {kv_heads} kv heads, {dim} dims");
        }
        let embed_q = ct.tensor(r, "token_embd.weight", dev)?;
        let vocab = match embed_q.shape().dims() {
            &[v, d] if v > 0 && d == dim => v,
            other => candle_core::bail!("the GGUF's token_embd.weight has shape {other:?}, not [vocab, {dim}]"),
        };
        if embed_q.dtype().block_size() > 0 && dim % embed_q.dtype().block_size() != 0 {
            candle_core::bail!("the GGUF's token_embd.weight rows are not whole {:?} blocks", embed_q.dtype());
        }
        let embed = Arc::new(embed_q);
        let output = match ct.tensor(r, "output.weight", dev) {
            Ok(t) if t.shape().dims() != [vocab, dim] => {
                candle_core::bail!("the GGUF's output.weight has shape {:?}, not [{vocab}, {dim}]", t.shape().dims())
            }
            Ok(t) => QMatMul::from_qtensor(with_fast_kernel(t)?)?,
            // Tied: the embeddings, shared unless they are requantized.
            Err(_) => match requantized(&embed)? {
                Some(t) => QMatMul::from_qtensor(t)?,
                None => QMatMul::from_arc(Arc::clone(&embed))?,
            },
        };
        let mut layers = Vec::with_capacity(blocks);
        let kv_dim = kv_heads * (dim / heads);
        for i in 0..blocks {
            // Every shape is checked here: a decode step splits rows by them without looking.
            let mut t = |name: &str, want: &[usize]| {
                let name = format!("blk.{i}.{name}.weight");
                let t = ct.tensor(r, &name, dev)?;
                let have = t.shape().dims();
                if !want.is_empty() && (have != want || have.contains(&0)) {
                    candle_core::bail!("the GGUF's {name} has shape {have:?}, not {want:?}");
                }
                Ok(t)
            };
            let gate = t("ffn_gate", &[])?;
            let ffn = match gate.shape().dims() {
                &[n, k] if n > 0 && k == dim => n,
                other => candle_core::bail!("the GGUF's blk.{i}.ffn_gate.weight has shape {other:?}"),
            };
            let (attn_norm, ffn_norm) = (t("attn_norm", &[dim])?, t("ffn_norm", &[dim])?);
            let qkv = vec![t("attn_q", &[dim, dim])?, t("attn_k", &[kv_dim, dim])?, t("attn_v", &[kv_dim, dim])?];
            layers.push(Layer {
                qkv: Group::new(qkv, dense)?,
                wo: Dual::new(t("attn_output", &[dim, dim])?, dense)?,
                gate_up: Group::new(vec![gate, t("ffn_up", &[ffn, dim])?], dense)?,
                down: Dual::new(t("ffn_down", &[dim, ffn])?, dense)?,
                attn_norm_w: attn_norm.dequantize(dev)?.flatten_all()?.to_vec1()?,
                ffn_norm_w: ffn_norm.dequantize(dev)?.flatten_all()?.to_vec1()?,
                attn_norm: RmsNorm::from_qtensor(attn_norm, eps)?,
                ffn_norm: RmsNorm::from_qtensor(ffn_norm, eps)?,
            });
        }
        let norm_q = ct.tensor(r, "output_norm.weight", dev)?;
        if norm_q.shape().dims() != [dim] {
            candle_core::bail!("the GGUF's output_norm.weight has shape {:?}, not [{dim}]", norm_q.shape().dims());
        }
        let norm_w = norm_q.dequantize(dev)?.flatten_all()?.to_vec1()?;
        let norm = RmsNorm::from_qtensor(norm_q, eps)?;
        // Rotary tables: position p, pair i turns by p / base^(2i/d).
        let half = rope_dim / 2;
        let mut cos = Vec::with_capacity(max_context * half);
        let mut sin = Vec::with_capacity(max_context * half);
        for p in 0..max_context {
            for i in 0..half {
                let angle = p as f32 / base.powf(2.0 * i as f32 / rope_dim as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let plain = Plain { norm_w, eps: eps as f32, cos: cos.clone(), sin: sin.clone(), half };
        let cos = Tensor::from_vec(cos, (max_context, half), dev)?;
        let sin = Tensor::from_vec(sin, (max_context, half), dev)?;
        // Llama-style GGUFs pair dimensions (2i, 2i+1); NeoX-style architectures are not
        // "llama" and are refused before this.
        Ok(Self {
            embed,
            vocab,
            dim,
            layers,
            norm,
            output,
            cos,
            sin,
            plain,
            heads,
            kv_heads,
            head_dim: dim / heads,
            neox: false,
            max_context,
        })
    }

    /// Makes room in `cache` for `needed` positions, keeping its first `keep`.
    fn reserve(&self, cache: &mut KvCache, needed: usize, keep: usize) -> Result<()> {
        if needed <= cache.capacity && cache.layers.len() == self.layers.len() {
            return Ok(());
        }
        // Room for a tool result or two more, so that the resume after a call does not copy.
        // Past half the context, straight to all of it: the old cache is copied into the new
        // one, so growing is never held at more than one and a half full caches (what
        // `memory_need` counts).
        let want = (needed + 512).max(cache.capacity * 2).next_multiple_of(256);
        let capacity = if want > self.max_context / 2 { self.max_context } else { want };
        let mut layers = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let k = Tensor::zeros((self.kv_heads, capacity, self.head_dim), DType::F32, &Device::Cpu)?;
            let v = k.zeros_like()?;
            if let (Some((ok, ov)), true) = (cache.layers.get(i), keep > 0) {
                k.slice_set(&ok.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
                v.slice_set(&ov.narrow(1, 0, keep)?.contiguous()?, 1, 0)?;
            }
            layers.push((k, v));
        }
        cache.layers = layers;
        cache.capacity = capacity;
        Ok(())
    }

    /// A copy of `cache`'s first `len` positions, as a new cache (a shared prompt prefix).
    pub fn copy_prefix(&self, cache: &KvCache, len: usize) -> Result<KvCache> {
        let mut out = KvCache::default();
        if len == 0 || cache.layers.is_empty() {
            return Ok(out);
        }
        self.reserve(&mut out, len, 0)?;
        for ((k, v), (ok, ov)) in out.layers.iter().zip(&cache.layers) {
            k.slice_set(&ok.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            v.slice_set(&ov.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
        }
        Ok(out)
    }

    /// Feeds `tokens` at positions `pos..`; returns the logits after the last one. Positions
    /// from `pos` on are overwritten, so feeding at an earlier position rewinds.
    pub fn forward(&self, cache: &mut KvCache, tokens: &[u32], pos: usize) -> Result<Vec<f32>> {
        let s = tokens.len();
        let total = pos + s;
        if s == 0 || total > self.max_context {
            candle_core::bail!("{total} positions do not fit the context of {}", self.max_context);
        }
        // One token is a decode step: on plain rows, as a batch of one.
        if let [token] = tokens {
            return self.decode_batch(&mut [Step { cache, token: *token, pos }]).map(|mut l| l.remove(0));
        }
        self.reserve(cache, total, pos)?;
        let dev = &Device::Cpu;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let rep = nh / nkv;
        let mut x = Tensor::from_vec(self.embedding_rows(tokens.iter().copied())?, (1, s, self.dim), dev)?;
        let cos = self.cos.narrow(0, pos, s)?;
        let sin = self.sin.narrow(0, pos, s)?;
        // Two tokens or more here: one is a decode step (above).
        let mask = causal_mask(s, pos)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, (kc, vc)) in self.layers.iter().zip(&cache.layers) {
            let h = l.attn_norm.forward(&x)?;
            let heads = |t: Tensor, n: usize| t.reshape((1, s, n, hd))?.transpose(1, 2)?.contiguous();
            let mut qkv = l.qkv.forward(&h, s)?.into_iter();
            let mut next = |n| qkv.next().map_or_else(|| candle_core::bail!("projection missing"), |t| heads(t, n));
            let (q, k, v) = (next(nh)?, next(nkv)?, next(nkv)?);
            let rope = if self.neox { candle_nn::rotary_emb::rope } else { candle_nn::rotary_emb::rope_i };
            let q = rope(&q, &cos, &sin)?;
            let k = rope(&k, &cos, &sin)?;
            kc.slice_set(&k.squeeze(0)?, 1, pos)?;
            vc.slice_set(&v.squeeze(0)?, 1, pos)?;
            let keys = kc.narrow(1, 0, total)?;
            let values = vc.narrow(1, 0, total)?;
            // The `rep` query heads of a group share one key/value head: (kv_heads, rep*s, hd).
            let q = q.reshape((nkv, rep * s, hd))?;
            let att = (q.matmul(&keys.t()?)? * scale)?;
            let att = att.reshape((nkv, rep, s, total))?.broadcast_add(&mask)?.reshape((nkv, rep * s, total))?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&values)?.reshape((1, nh, s, hd))?.transpose(1, 2)?.reshape((1, s, nh * hd))?;
            x = (x + l.wo.forward(&y, s)?)?;
            let h = l.ffn_norm.forward(&x)?;
            let gu = l.gate_up.forward(&h, s)?;
            let gated = (candle_nn::ops::silu(&gu[0])? * &gu[1])?;
            x = (x + l.down.forward(&gated, s)?)?;
        }
        let last = self.norm.forward(&x.narrow(1, s - 1, 1)?.squeeze(1)?)?;
        self.output.forward(&last)?.squeeze(0)?.to_vec1()
    }
}

impl Model {
    /// One decode step for several sequences at once: every projection is one matmul over
    /// all of them (the weights are read once per step, not once per sequence), and each
    /// attends to its own cache. Returns each sequence's logits, in order. The quantized
    /// kernels treat each row on its own, so the logits are those of single steps.
    pub fn decode_batch(&self, seqs: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        let b = seqs.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        for st in seqs.iter_mut() {
            if st.pos >= self.max_context {
                candle_core::bail!("position {} does not fit the context of {}", st.pos, self.max_context);
            }
            self.reserve(st.cache, st.pos + 1, st.pos)?;
        }
        let dev = &Device::Cpu;
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (dim, rep, p) = (nh * hd, nh / nkv, &self.plain);
        // The batch is the rows of one matrix, as a prefill's tokens are. Between the
        // matrices, the small steps (norms, rotations, the gate) are loops over plain rows:
        // as candle ops, their dispatch cost more than their arithmetic.
        let mut x = self.embeddings(seqs)?;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        for (li, l) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &l.attn_norm_w, p.eps);
            let qkv = l.qkv.rows(&h, b)?;
            let width = qkv.len() / b;
            let mut qs = vec![0f32; b * dim];
            for (i, st) in seqs.iter().enumerate() {
                let row = &qkv[i * width..(i + 1) * width];
                let (q, rest) = row.split_at(dim);
                let (k, v) = rest.split_at(nkv * hd);
                let (cos, sin) = (&p.cos[st.pos * p.half..][..p.half], &p.sin[st.pos * p.half..][..p.half]);
                let q_out = &mut qs[i * dim..(i + 1) * dim];
                q_out.copy_from_slice(q);
                rope_interleaved(q_out, cos, sin, hd);
                let mut k = k.to_vec();
                rope_interleaved(&mut k, cos, sin, hd);
                // Each sequence's new key and value go into its cache.
                let (kc, vc) = &st.cache.layers[li];
                kc.slice_set(&Tensor::from_vec(k, (nkv, 1, hd), dev)?, 1, st.pos)?;
                vc.slice_set(&Tensor::from_slice(v, (nkv, 1, hd), dev)?, 1, st.pos)?;
            }
            // One pass computes every sequence's attention straight from the caches.
            let caches: Vec<(&Tensor, &Tensor, usize)> =
                seqs.iter().map(|st| (&st.cache.layers[li].0, &st.cache.layers[li].1, st.pos + 1)).collect();
            // One work item per sequence and key/value head.
            let items: Vec<Mutex<Vec<f32>>> = (0..b * nkv).map(|_| Mutex::new(Vec::new())).collect();
            crate::pool::each(b * nkv, |item| {
                let (i, group) = (item / nkv, item % nkv);
                let (kc, vc, total) = caches[i];
                let q = &qs[i * dim..(i + 1) * dim];
                let out = attend_cached(q, kc, vc, total, group, rep, scale)?;
                *items[item].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = out;
                Ok(())
            })?;
            let ys: Vec<f32> = items
                .into_iter()
                .flat_map(|m| m.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner))
                .collect();
            add(&mut x, &l.wo.rows(&ys, b)?);
            let h = rms_norm(&x, &l.ffn_norm_w, p.eps);
            let gu = l.gate_up.rows(&h, b)?;
            add(&mut x, &l.down.rows(&gated(&gu, b), b)?);
        }
        let last = rms_norm(&x, &p.norm_w, p.eps);
        let logits = match q8_rows(&self.output, &last, b)? {
            Some(l) => l,
            None => self.output.forward(&Tensor::from_vec(last, (b, dim), dev)?)?.flatten_all()?.to_vec1()?,
        };
        let vocab = logits.len() / b;
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The embeddings of the steps' tokens, one row each.
    fn embeddings(&self, seqs: &[Step<'_>]) -> Result<Vec<f32>> {
        self.embedding_rows(seqs.iter().map(|st| st.token))
    }

    /// The embedding rows of `tokens`, dequantized from the GGUF's table one row at a time.
    fn embedding_rows(&self, tokens: impl ExactSizeIterator<Item = u32>) -> Result<Vec<f32>> {
        let dev = &Device::Cpu;
        let data = self.embed.data()?;
        let row = data.len() / self.vocab.max(1);
        let mut x = Vec::with_capacity(tokens.len() * self.dim);
        for t in tokens {
            let t = t as usize;
            let Some(bytes) = data.get(t * row..(t + 1) * row).filter(|_| t < self.vocab) else {
                candle_core::bail!("token {t} is not in the vocabulary of {}", self.vocab);
            };
            let q = qtensor_from_ggml(self.embed.dtype(), bytes, vec![self.dim], dev)?;
            x.extend(q.dequantize(dev)?.to_vec1::<f32>()?);
        }
        Ok(x)
    }
}

/// `x` (`m` rows) through `w` with [`q8::matmul`], if it applies.
fn q8_rows(w: &QMatMul, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    match w {
        QMatMul::QTensor(t) => q8::matmul(t, x, m),
        _ => Ok(None),
    }
}

/// Each row of `x` (rows of `w.len()`) divided by its root mean square, times `w`: candle's
/// `rms_norm`, in its order.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / dim as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, a)| v / m * a));
    }
    out
}

/// Rotates the pairs (2i, 2i+1) of every head of `x` (heads of `hd`) by the position's
/// angles: candle's `rope_i`.
fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32], hd: usize) {
    for head in x.chunks_exact_mut(hd) {
        for (pair, (c, s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// `x += y`, element by element.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `silu(gate) * up` of each row of `gu` (`m` rows, gate then up side by side).
fn gated(gu: &[f32], m: usize) -> Vec<f32> {
    let width = gu.len() / m.max(1) / 2;
    let mut out = Vec::with_capacity(m * width);
    for row in gu.chunks_exact(2 * width) {
        let (g, u) = row.split_at(width);
        out.extend(g.iter().zip(u).map(|(g, u)| g / ((-g).exp() + 1.0) * u));
    }
    out
}

/// The query heads of key/value head `group` (`rep` of them) of one token, `q` holding all
/// its heads, over the first `total` positions of a cache `(kv_heads, capacity, head_dim)`.
fn attend_cached(
    q: &[f32],
    kc: &Tensor,
    vc: &Tensor,
    total: usize,
    group: usize,
    rep: usize,
    scale: f32,
) -> Result<Vec<f32>> {
    let (ks, kl) = kc.storage_and_layout();
    let (vs, vl) = vc.storage_and_layout();
    let (Storage::Cpu(kcpu), Storage::Cpu(vcpu)) = (&*ks, &*vs) else {
        candle_core::bail!("the KV cache is not in CPU memory");
    };
    let (_, capacity, head_dim) = kc.dims3()?;
    if total > capacity {
        candle_core::bail!("{total} positions to attend to in a cache of {capacity}");
    }
    let span = capacity * head_dim;
    let at = |l: &candle_core::Layout| l.start_offset() + group * span;
    let keys = &kcpu.as_slice::<f32>()?[at(kl)..at(kl) + span];
    let values = &vcpu.as_slice::<f32>()?[at(vl)..at(vl) + span];
    let q = &q[group * rep * head_dim..(group + 1) * rep * head_dim];
    let mut out = vec![0f32; rep * head_dim];
    attend(q, keys, values, Shape { heads: rep, head_dim, total, scale }, &mut out);
    Ok(out)
}

/// The sizes [`attend`] works with.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Query heads that share the key/value head.
    heads: usize,
    head_dim: usize,
    /// Positions to attend to.
    total: usize,
    scale: f32,
}

/// One query token's attention for the query heads that share one key/value head: `q` and
/// `out` are `(heads, head_dim)`, `keys` and `values` that head's cache rows, position by
/// position. Each key and value row is read once for all those heads (at 700 positions, a
/// layer's cache is about 1 MB, which SmolLM2's three query heads per key/value head used
/// to read three times a step); each head's sums run in the order of one head alone, so the
/// results are the same bit for bit.
fn attend(q: &[f32], keys: &[f32], values: &[f32], s: Shape, out: &mut [f32]) {
    let (hd, total) = (s.head_dim, s.total);
    // Per head, its scores over the positions.
    let mut scores = vec![0f32; s.heads * total];
    for (p, k) in keys.chunks_exact(hd).take(total).enumerate() {
        for (h, qh) in q.chunks_exact(hd).take(s.heads).enumerate() {
            scores[h * total + p] = dot(qh, k) * s.scale;
        }
    }
    for head in scores.chunks_exact_mut(total.max(1)) {
        let max = head.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let mut sum = 0f32;
        for sc in head.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        for sc in head.iter_mut() {
            *sc /= sum;
        }
    }
    out.fill(0.0);
    for (p, v) in values.chunks_exact(hd).take(total).enumerate() {
        for (h, o) in out.chunks_exact_mut(hd).take(s.heads).enumerate() {
            let w = scores[h * total + p];
            for (od, vd) in o.iter_mut().zip(v) {
                *od += w * vd;
            }
        }
    }
}

/// `(s, pos + s)`: 0 where query `i` (at position `pos + i`) may attend, -inf after it.
fn causal_mask(s: usize, pos: usize) -> Result<Tensor> {
    let total = pos + s;
    let m: Vec<f32> =
        (0..s).flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(m, (s, total), &Device::Cpu)
}
