//! A loaded model: the weights of a llama-family GGUF (the forward pass, `forward`) and its
//! tokenizer, built from the GGUF itself. Shared by every conversation over it ([`crate::llm`])
//! and by the batching model thread ([`crate::batch`]).

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::Tokenizer;

use crate::forward::Model;
use crate::AgentError;

/// Longest context agentd gives a model (fewer if the GGUF says so).
pub const MAX_CONTEXT: usize = 4096;

/// Facts about the loaded model, for transcripts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The file.
    pub path: String,
    /// `general.name` from the GGUF, if any.
    pub name: String,
    /// `general.architecture`.
    pub architecture: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context length agentd allows.
    pub context: usize,
    /// For a model server: how it held its model to the protocol (see
    /// [`crate::openai::Form`]), once found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constraints: Option<String>,
}

/// What every conversation over one loaded model shares: the weights and the tokenizer.
pub struct Weights {
    pub(crate) model: Model,
    pub(crate) tokenizer: Tokenizer,
    /// The same, with special tokens disabled: for text that is not the template's, which
    /// must not become a control token whatever it spells.
    pub(crate) plain_tokenizer: Tokenizer,
    /// Every token's bytes (byte-level BPE undone); empty for special tokens.
    pub(crate) vocab: Vec<Vec<u8>>,
    pub(crate) end_ids: Vec<u32>,
    pub(crate) info: ModelInfo,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("info", &self.info).finish_non_exhaustive()
    }
}

impl Weights {
    /// The model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
}

impl Weights {
    /// Loads a GGUF file, for one conversation at a time.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        Self::load_for(path, 1, 0)
    }

    /// Loads a GGUF file for up to `live` conversations at once, with `kept` bytes of KV
    /// caches held aside besides (a daemon's paused conversations and prefix cache): the
    /// memory plan counts them all.
    pub fn load_for(path: &Path, live: usize, kept: u64) -> Result<Self, AgentError> {
        let model_err = |e: candle_core::Error| AgentError::Model(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
        let ct = gguf_file::Content::read(&mut file).map_err(model_err)?;
        let architecture = meta_str(&ct, "general.architecture");
        if architecture != "llama" {
            return Err(AgentError::Model(format!(
                "{}: architecture {architecture:?} is not llama-family (SmolLM, Llama, Mistral...)",
                path.display()
            )));
        }
        let name = meta_str(&ct, "general.name");
        let mut tokenizer = Tokenizer::from_gguf(&ct).map_err(model_err)?;
        // candle's default byte-level pipeline adds a space before every text segment (between
        // special tokens too: "<|im_start|> system"). GPT-2-style GGUFs say whether they want
        // one; SmolLM2's does not.
        let prefix_space = ct.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok());
        if meta_str(&ct, "tokenizer.ggml.model") == "gpt2" && prefix_space != Some(true) {
            tokenizer
                .with_pre_tokenizer(Some(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true)));
        }
        let context = ct
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(MAX_CONTEXT, |n| (n as usize).clamp(16, MAX_CONTEXT));
        let mut need = crate::forward::memory_need(&ct, context).map_err(model_err)?;
        need.kv = need.kv.saturating_mul(live.max(1) as u64).saturating_add(kept);
        let dense = plan_memory(path, &need, context, available_memory())?;
        let model = Model::load(&ct, &mut file, context, dense).map_err(model_err)?;
        let alphabet = byte_of_char();
        let size = tokenizer.get_vocab_size(true);
        let specials: Vec<u32> = tokenizer.get_added_tokens_decoder().keys().copied().collect();
        let vocab = (0..size as u32)
            .map(|id| match tokenizer.id_to_token(id) {
                Some(_) if specials.contains(&id) => Vec::new(),
                Some(t) => t.chars().map(|c| alphabet.get(&c).copied().unwrap_or(b'?')).collect(),
                None => Vec::new(),
            })
            .collect();
        let end_ids: Vec<u32> =
            ["<|im_end|>", "<|endoftext|>", "</s>"].iter().filter_map(|t| tokenizer.token_to_id(t)).collect();
        let info =
            ModelInfo { path: path.display().to_string(), name, architecture, vocab: size, context, constraints: None };
        let mut plain_tokenizer = tokenizer.clone();
        plain_tokenizer.set_encode_special_tokens(true);
        Ok(Self { model, tokenizer, plain_tokenizer, vocab, end_ids, info })
    }
}

/// Memory kept free beside what a model is counted to take: activations, the tokenizer,
/// the process itself.
const MEMORY_SLACK: u64 = 64 << 20;

/// Memory this process may still take: the least of the host's `MemAvailable` and, for its
/// memory cgroup and every parent with a limit, the limit less what is charged now (less its
/// inactive file cache, which the kernel reclaims before it fails an allocation); with where
/// that least figure comes from. Cgroup hierarchies are looked for where systemd mounts them
/// (`/sys/fs/cgroup`, `/sys/fs/cgroup/unified`, `/sys/fs/cgroup/memory`).
pub fn available_memory() -> Option<(u64, String)> {
    let mut best: Option<(u64, String)> = None;
    let mut consider = |bytes: u64, from: String| {
        if best.as_ref().is_none_or(|(b, _)| bytes < *b) {
            best = Some((bytes, from));
        }
    };
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        let kb = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok());
        if let Some(kb) = kb {
            consider(kb * 1024, "the host's MemAvailable".into());
        }
    }
    // The memory cgroup and its parents: v2 ("0::/path", at /sys/fs/cgroup, or at
    // /sys/fs/cgroup/unified on hybrid hosts) and v1 ("N:...memory...:/path").
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(rel)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let rel = rel.trim_start_matches('/');
        let places: Vec<(std::path::PathBuf, &str, &str, &str)> = if controllers.is_empty() {
            ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .map(|b| (Path::new(b).join(rel), "memory.max", "memory.current", "inactive_file"))
                .collect()
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
            vec![(dir, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
        } else {
            continue;
        };
        for (mut dir, max_file, current_file, inactive) in places {
            let top = dir.ancestors().nth(rel.split('/').filter(|c| !c.is_empty()).count()).map(Path::to_path_buf);
            loop {
                let read =
                    |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|v| v.trim().parse::<u64>().ok());
                // "max" (v2) does not parse; v1's "no limit" is a number near 2^63.
                if let (Some(max), Some(current)) = (read(max_file).filter(|m| *m < 1 << 62), read(current_file)) {
                    let cache = std::fs::read_to_string(dir.join("memory.stat"))
                        .ok()
                        .and_then(|st| {
                            st.lines()
                                .find_map(|l| l.strip_prefix(inactive)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
                        })
                        .unwrap_or(0);
                    consider(
                        max.saturating_sub(current.saturating_sub(cache)),
                        format!("{}/{max_file}", dir.display()),
                    );
                }
                if Some(&dir) == top.as_ref() || !dir.pop() {
                    break;
                }
            }
        }
    }
    best
}

fn mb(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Whether the model gets f32 copies of its matrices for prefill (`AGENTD_PREFILL_WEIGHTS`:
/// `dense`, `quantized`, or by default when they fit in `available`), or an error with the
/// numbers when the model cannot fit at all: refused here rather than killed for memory later.
/// Most memory the f32 copies for prefill may take unless asked for:
/// `$AGENTD_DENSE_BUDGET_MB`, else 1,024 MiB.
pub const DENSE_BUDGET_MB: u64 = 1024;

fn dense_budget() -> u64 {
    std::env::var("AGENTD_DENSE_BUDGET_MB").ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(DENSE_BUDGET_MB)
        << 20
}

pub(crate) fn plan_memory(
    path: &Path,
    need: &crate::forward::MemoryNeed,
    context: usize,
    available: Option<(u64, String)>,
) -> Result<bool, AgentError> {
    let asked = std::env::var("AGENTD_PREFILL_WEIGHTS").unwrap_or_default();
    let fits = |dense: bool| available.as_ref().is_none_or(|(a, _)| need.total(dense) + MEMORY_SLACK <= *a);
    let dense = match asked.as_str() {
        "quantized" => false,
        "dense" => true,
        other => {
            if !other.is_empty() {
                tracing::warn!(value = other, "AGENTD_PREFILL_WEIGHTS is dense or quantized; left to agentd");
            }
            // The copies pay where a model is small (the embedded one's prefill runs 1.15-1.45x
            // llama.cpp's with them, 1.07x without) and cost four bytes a weight: past the
            // budget they are left out (a 1.1B Q8_0 model prefills at the same speed without
            // them, in 1.4 GiB instead of 5.1).
            let budget = dense_budget();
            if need.dense > budget {
                tracing::info!(
                    copies_mb = mb(need.dense),
                    budget_mb = mb(budget),
                    "prefill uses the quantized weights: their f32 copies are over AGENTD_DENSE_BUDGET_MB"
                );
            }
            let dense = need.dense <= budget && fits(true);
            if !dense && need.dense <= budget && fits(false) {
                tracing::warn!(
                    copies_mb = mb(need.dense),
                    available_mb = available.as_ref().map_or(0, |(a, _)| mb(*a)),
                    "prefill uses the quantized weights: their f32 copies do not fit in memory"
                );
            }
            dense
        }
    };
    if fits(dense) {
        return Ok(dense);
    }
    let (avail, from) = available.unwrap_or_default();
    let copies = if dense {
        format!(
            ", {} MB of f32 copies for prefill, which AGENTD_PREFILL_WEIGHTS=dense asks for (unset it to go without)",
            mb(need.dense)
        )
    } else {
        String::new()
    };
    Err(AgentError::Model(format!(
        "{}: the model does not fit in memory: it needs about {} MB ({} MB of weights, {} MB of KV cache at {context} tokens a \
         conversation, {} MB while loading{copies}, and {} MB to work in), and {} MB are available ({from}). Use a smaller \
         model or a smaller quantization, or give agentd more memory",
        path.display(),
        mb(need.total(dense) + MEMORY_SLACK),
        mb(need.weights),
        mb(need.kv),
        mb(if dense { need.transient_dense } else { need.transient }),
        mb(MEMORY_SLACK),
        mb(avail),
    )))
}

/// GPT-2's byte-level alphabet: which char stands for which byte in a token's text.
fn byte_of_char() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = std::collections::HashMap::new();
    let mut extra = 0;
    for b in 0u32..256 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        if let Some(ch) = char::from_u32(c) {
            map.insert(ch, b as u8);
        }
    }
    map
}

fn meta_str(ct: &gguf_file::Content, key: &str) -> String {
    ct.metadata.get(key).and_then(|v| v.to_string().ok().cloned()).unwrap_or_default()
}
