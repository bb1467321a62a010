//! A tiny llama GGUF written by the test itself (random weights, a byte-level vocabulary
//! with ChatML specials), so the fast suite needs no download. For this crate's tests and,
//! with the `testkit` feature, the agent loop's in the binary.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-level alphabet, in byte order.
fn alphabet() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).map(String::from).unwrap_or_default()
        })
        .collect()
}

/// Writes a one-layer llama with embedding width 16 and the vocabulary above.
pub fn tiny_gguf(dir: &Path) -> PathBuf {
    tiny_gguf_with(dir, 2, 2, 1)
}

/// The same with `heads` query heads sharing `kv_heads` key/value heads, over `layers`.
pub fn tiny_gguf_with(dir: &Path, heads: usize, kv_heads: usize, layers: usize) -> PathBuf {
    tiny_gguf_shaped(dir, (heads, kv_heads, layers), (16, 32), GgmlDType::F32)
}

/// A tiny llama of `(heads, kv_heads, layers)`, embedding width and feed-forward width
/// `(dim, hidden)`, and matrices of type `dtype`.
pub fn tiny_gguf_shaped(
    dir: &Path,
    (heads, kv_heads, layers): (usize, usize, usize),
    (dim, hidden): (usize, usize),
    dtype: GgmlDType,
) -> PathBuf {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(alphabet());
    // Two merges, so that BPE is exercised: "h"+"e" and "he"+"l".
    tokens.push("he".into());
    tokens.push("hel".into());
    let merges = vec!["h e".to_string(), "he l".to_string()];
    let mut types = vec![3i32; SPECIALS.len()];
    types.extend(std::iter::repeat_n(1, tokens.len() - SPECIALS.len()));
    let vocab = tokens.len();
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny".into())),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.embedding_length", Value::U32(dim as u32)),
        // What llama.cpp needs too, so the same file can be measured beside it.
        ("llama.feed_forward_length", Value::U32(hidden as u32)),
        ("llama.context_length", Value::U32(4096)),
        ("llama.rope.dimension_count", Value::U32((dim / heads) as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let dev = Device::Cpu;
    let t = |shape: &[usize], seed: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| (i as f32 * 12.9898 + seed).sin() * 0.5).collect();
        let tensor = Tensor::from_vec(data, shape, &dev).expect("tensor");
        QTensor::quantize(&tensor, dtype).expect("quantize")
    };
    let ones = |n: usize| {
        QTensor::quantize(&Tensor::ones(n, candle_core::DType::F32, &dev).expect("ones"), GgmlDType::F32).expect("q")
    };
    let kv = kv_heads * dim / heads;
    let mut tensors = vec![
        ("token_embd.weight".to_string(), t(&[vocab, dim], 1.0)),
        ("output_norm.weight".to_string(), ones(dim)),
        ("output.weight".to_string(), t(&[vocab, dim], 2.0)),
    ];
    for l in 0..layers {
        let seed = 10.0 * l as f32;
        for (name, shape, s) in [
            ("attn_q", [dim, dim], 3.0),
            ("attn_k", [kv, dim], 4.0),
            ("attn_v", [kv, dim], 5.0),
            ("attn_output", [dim, dim], 6.0),
            ("ffn_gate", [hidden, dim], 7.0),
            ("ffn_down", [dim, hidden], 8.0),
            ("ffn_up", [hidden, dim], 9.0),
        ] {
            tensors.push((format!("blk.{l}.{name}.weight"), t(&shape, s + seed)));
        }
        tensors.push((format!("blk.{l}.attn_norm.weight"), ones(dim)));
        tensors.push((format!("blk.{l}.ffn_norm.weight"), ones(dim)));
    }
    let path = dir.join(format!("tiny-{heads}-{kv_heads}-{layers}-{dim}-{dtype:?}.gguf"));
    let mut f = std::fs::File::create(&path).expect("create gguf");
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    path
}
