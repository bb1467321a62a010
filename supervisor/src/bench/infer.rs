//! `agentd bench infer`: prefill and decode speed of the in-process model, and the cost of
//! resuming after a tool call with the KV cache kept (a) against re-prefilling the whole
//! context (b), as wrapper-style stacks do after every call. llama.cpp (through
//! `llama-cpp-python`) runs beside it when it is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

use agentd_model::fetch;
use agentd_model::llm::Llm;

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    context_tokens: usize,
    prefill_tps: f64,
    decode_tokens: usize,
    decode_tps: f64,
    resume_tokens: usize,
    resume_kept_ms: f64,
    resume_reprefill_ms: f64,
    reprefill_over_kept: f64,
    llama_cpp: Option<serde_json::Value>,
}

/// Text of roughly `tokens` tokens: the demo's notes, repeated.
fn filler(llm: &Llm, tokens: usize) -> Result<Vec<u32>, String> {
    let base = "- 2026-10-02 api-gateway: p99 latency rose to 840 ms after the TLS library upgrade; rolled back.\n\
                - 2026-10-19 billing-worker: queue backlog of 12,400 jobs; root cause a stuck lock in the retry path.\n";
    let mut ids = llm.encode("<|im_start|>user\n").map_err(|e| e.to_string())?;
    let chunk = llm.encode(base).map_err(|e| e.to_string())?;
    while ids.len() < tokens {
        ids.extend(&chunk);
    }
    ids.truncate(tokens);
    Ok(ids)
}

fn argmax(l: &[f32]) -> u32 {
    (0..l.len()).max_by(|a, b| l[*a].total_cmp(&l[*b])).unwrap_or(0) as u32
}

pub(crate) fn run(model: Option<PathBuf>, context: usize, decode: usize, json: bool) -> Result<(), String> {
    let path = match model {
        Some(p) => p,
        None => fetch::embedded_model().map_err(|e| e.to_string())?,
    };
    let mut llm = Llm::load(&path).map_err(|e| e.to_string())?;
    let ctx = filler(&llm, context)?;
    let result = llm.encode("<|im_end|>\n<|im_start|>user\n<tool_result tool=\"search\" exit_code=\"0\">\nservices.csv:3:billing-worker,payments,1,kenji\n</tool_result><|im_end|>\n<|im_start|>assistant\n").map_err(|e| e.to_string())?;

    // Prefill, then decode.
    llm.reset();
    let t = Instant::now();
    let mut logits = llm.feed(&ctx).map_err(|e| e.to_string())?;
    let prefill_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..decode {
        let id = argmax(&logits);
        logits = llm.feed(&[id]).map_err(|e| e.to_string())?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    if !json {
        eprintln!("agentd: bench infer: prefill and decode done; timing the resume");
    }

    // (a) The interrupt cycle as agentd runs it: the context is in the KV cache; only the
    // tool result is fed, then the first new token.
    llm.reset();
    llm.feed(&ctx).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let l = llm.feed(&result).map_err(|e| e.to_string())?;
    llm.feed(&[argmax(&l)]).map_err(|e| e.to_string())?;
    let kept = t.elapsed().as_secs_f64();

    // (b) Re-prefilling everything after the call.
    llm.reset();
    let t = Instant::now();
    let mut all = ctx.clone();
    all.extend(&result);
    let l = llm.feed(&all).map_err(|e| e.to_string())?;
    llm.feed(&[argmax(&l)]).map_err(|e| e.to_string())?;
    let reprefill = t.elapsed().as_secs_f64();

    let report = Report {
        model: path.display().to_string(),
        context_tokens: ctx.len(),
        prefill_tps: ctx.len() as f64 / prefill_s,
        decode_tokens: decode,
        decode_tps: decode as f64 / decode_s,
        resume_tokens: result.len(),
        resume_kept_ms: kept * 1000.0,
        resume_reprefill_ms: reprefill * 1000.0,
        reprefill_over_kept: reprefill / kept,
        llama_cpp: llama_cpp(&path, ctx.len(), decode),
    };
    if json {
        outln!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    outln!("model {} ({} threads)", report.model, std::thread::available_parallelism().map_or(1, |n| n.get()));
    outln!("  prefill   {:>7.1} tok/s  ({} tokens)", report.prefill_tps, report.context_tokens);
    outln!("  decode    {:>7.1} tok/s  ({} tokens after the context; target >= 40)", report.decode_tps, decode);
    outln!(
        "interrupt cycle at {} tokens of context, {}-token tool result:",
        report.context_tokens,
        report.resume_tokens
    );
    outln!("  (a) resume with the KV cache kept   {:>8.1} ms", report.resume_kept_ms);
    outln!("  (b) re-prefill the whole context    {:>8.1} ms", report.resume_reprefill_ms);
    outln!("  b/a {:.1} (target >= 10)", report.reprefill_over_kept);
    match &report.llama_cpp {
        Some(v) if v.get("error").is_none() => {
            let (p, d) = (v["prefill_tps"].as_f64().unwrap_or(0.0), v["decode_tps"].as_f64().unwrap_or(0.0));
            outln!("llama.cpp (llama-cpp-python, 2 threads), same GGUF:");
            outln!("  prefill   {p:>7.1} tok/s   candle/llama.cpp {:.2}", report.prefill_tps / p.max(1e-9));
            outln!("  decode    {d:>7.1} tok/s   candle/llama.cpp {:.2}", report.decode_tps / d.max(1e-9));
        }
        Some(v) => outln!("llama.cpp: {}", v["error"].as_str().unwrap_or("failed")),
        None => outln!(
            "llama.cpp: not installed (python3 -m venv {0} && {0}/bin/pip install llama-cpp-python builds it, \
             about 10 minutes here)",
            llama_venv().display()
        ),
    }
    Ok(())
}

/// Times llama.cpp on the same model, if `llama_cpp` imports.
fn llama_cpp(model: &Path, context: usize, decode: usize) -> Option<serde_json::Value> {
    let python = llama_python()?;
    let script = r#"
import json, sys, time
from llama_cpp import Llama
path, ctx, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = Llama(model_path=path, n_ctx=max(2048, ctx + n + 64), n_threads=2, n_batch=512, verbose=False)
text = ("- 2026-10-02 api-gateway: p99 latency rose to 840 ms after the TLS library upgrade; rolled back.\n" * 200)
toks = m.tokenize(text.encode())[:ctx]
t = time.time(); m.eval(toks); p = time.time() - t
# The prompt is in llama.cpp's cache now: the completion decodes only.
t = time.time(); out = m.create_completion(toks, max_tokens=n, temperature=0.0, top_k=1); d = time.time() - t
n = max(1, out["usage"]["completion_tokens"])
print(json.dumps({"prefill_tps": len(toks) / p, "decode_tps": n / d, "decode_tokens": n}))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(model)
        .arg(context.to_string())
        .arg(decode.to_string())
        .output()
        .ok()?;
    Some(serde_json::from_slice(&out.stdout).unwrap_or_else(
        |_| serde_json::json!({ "error": format!("llama-cpp-python failed: {}", String::from_utf8_lossy(&out.stderr).trim()) }),
    ))
}

/// Where a virtual environment with llama-cpp-python is looked for first (the one the tests
/// of model servers build): beside the model cache, `~/.cache/agentd/llama-venv`.
pub(crate) fn llama_venv() -> PathBuf {
    let models = fetch::cache_dir();
    models.parent().unwrap_or(&models).join("llama-venv")
}

/// A Python that imports `llama_cpp`: the cached virtual environment's, else `python3`.
fn llama_python() -> Option<PathBuf> {
    let venv = llama_venv().join("bin/python3");
    [venv, PathBuf::from("python3")]
        .into_iter()
        .find(|py| Command::new(py).args(["-c", "import llama_cpp"]).output().is_ok_and(|o| o.status.success()))
}
