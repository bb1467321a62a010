//! `agentd bench bfcl`: the Berkeley Function-Calling Leaderboard (BFCL v4, PyPI `bfcl-eval`)
//! against the in-process model, with constrained decoding and without.
//!
//! Each question's function definitions become a manifest's tool declarations (TOML, parsed
//! by `agentd_policy` like any other manifest). The model gets the prompt `agentd run` builds
//! from that manifest, and its first turn is decoded twice from the same KV cache: once
//! constrained, as `agentd run` does, and once free. BFCL's own AST checker scores the calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use agentd_policy::grammar::{CallGrammar, Offered, ParsedCall};
use agentd_policy::{ArgKind, Manifest, Name};
use serde::Serialize;
use serde_json::{json, Map, Value};

use agentd_model::engine::{Engine, Local, Outcome, RunConfig, Silent};
use agentd_model::fetch;
use agentd_model::llm::Llm;
use agentd_model::prompt;
use agentd_model::turn::{self, Rules};

/// The categories agentd's protocol can answer: one call, or none, per turn. (`parallel`
/// asks for several calls in one turn.)
pub(crate) const CATEGORIES: &[&str] = &["simple_python", "multiple", "irrelevance"];

/// Most tokens of one reply.
const REPLY_TOKENS: usize = 160;

const SCORER: &str = include_str!("bfcl_score.py");

/// One question, ready to run.
struct Question {
    id: String,
    category: String,
    task: String,
    manifest: Manifest,
}

/// What one decoding mode produced for one question.
#[derive(Debug, Serialize)]
struct Emitted {
    id: String,
    category: String,
    mode: &'static str,
    /// `call`, `none` (an answer, no call) or `invalid` (an attempted call that does not parse).
    kind: &'static str,
    /// `{tool: {arg: value}}`, as BFCL's checker takes it.
    call: Value,
    /// Whether the call names a granted tool with arguments its manifest accepts.
    policy_valid: bool,
    text: String,
}

#[derive(Debug, Default, Serialize)]
struct Tally {
    questions: usize,
    /// Replies that are a well-formed call.
    format_valid: usize,
    policy_valid: usize,
    correct: usize,
}

impl Tally {
    fn pct(n: usize, of: usize) -> f64 {
        100.0 * n as f64 / of.max(1) as f64
    }
}

fn scalar_toml(kind: &str, spec: &Value, lines: &mut Vec<String>) -> Result<(), String> {
    let enum_strings = || -> Option<Vec<Value>> {
        let e = spec.get("enum")?.as_array()?;
        e.iter().all(Value::is_string).then(|| e.clone())
    };
    match kind {
        "string" | "any" => {
            lines.push("type = \"string\"".into());
            if let Some(e) = enum_strings() {
                lines.push(format!("one_of = {}", Value::Array(e)));
            }
        }
        "integer" => lines.push("type = \"integer\"".into()),
        "float" | "number" => lines.push("type = \"number\"".into()),
        "boolean" => lines.push("type = \"boolean\"".into()),
        other => return Err(format!("type {other:?} has no manifest equivalent")),
    }
    Ok(())
}

/// A manifest whose tools are `functions`, or why they cannot be one.
fn manifest_toml(functions: &[Value]) -> Result<String, String> {
    let mut out = vec!["version = 1".to_string(), "[agent]".into(), "name = \"bfcl\"".into()];
    let mut seen = Vec::new();
    for f in functions {
        let raw = f["name"].as_str().ok_or("a function without a name")?;
        let name = raw.replace('.', "_");
        Name::parse(&name).map_err(|e| format!("function {raw:?}: {e}"))?;
        if seen.contains(&name) {
            return Err(format!("two functions become {name:?}"));
        }
        seen.push(name.clone());
        let params = f["parameters"]["properties"].as_object().cloned().unwrap_or_default();
        let required: Vec<&str> = f["parameters"]["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let argv: Vec<String> =
            std::iter::once("/bin/true".to_string()).chain(params.keys().map(|k| format!("{{{k}}}"))).collect();
        out.push(format!("[tools.{name}]"));
        out.push(format!("description = {}", Value::from(f["description"].as_str().unwrap_or(""))));
        out.push(format!("argv = {}", json!(argv)));
        for (pname, spec) in &params {
            Name::parse(pname).map_err(|e| format!("parameter {pname:?} of {raw:?}: {e}"))?;
            let mut lines = vec![format!("[tools.{name}.args.{pname}]")];
            let mut description = spec["description"].as_str().unwrap_or("").trim().to_string();
            if let Some(d) = spec.get("default") {
                description.push_str(&format!(" Default: {d}."));
            }
            lines.push(format!("description = {}", Value::from(description)));
            let kind = spec["type"].as_str().unwrap_or("string");
            if kind == "array" || kind == "tuple" {
                let items = &spec["items"];
                let item_kind = items["type"].as_str().unwrap_or("");
                lines.push("type = \"list\"".into());
                let mut item_lines = Vec::new();
                scalar_toml(item_kind, items, &mut item_lines)
                    .map_err(|e| format!("parameter {pname:?} of {raw:?}: items: {e}"))?;
                for l in item_lines {
                    lines.push(l.replacen("type =", "items =", 1));
                }
            } else {
                scalar_toml(kind, spec, &mut lines).map_err(|e| format!("parameter {pname:?} of {raw:?}: {e}"))?;
            }
            if !required.contains(&pname.as_str()) {
                lines.push("optional = true".into());
            }
            out.extend(lines);
        }
    }
    Ok(out.join("\n") + "\n")
}

/// The questions of `category`, `limit` of them evenly spaced (all if 0), and how many could
/// not be expressed as a manifest.
fn questions(suite: &Path, category: &str, limit: usize) -> Result<(Vec<Question>, Vec<String>), String> {
    let path = suite.join(format!("bfcl_eval/data/BFCL_v4_{category}.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let all: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let picked: Vec<&Value> = if limit == 0 || limit >= all.len() {
        all.iter().collect()
    } else {
        (0..limit).map(|i| &all[i * all.len() / limit]).collect()
    };
    let (mut out, mut skipped) = (Vec::new(), Vec::new());
    for q in picked {
        let id = q["id"].as_str().unwrap_or("?").to_string();
        let functions = q["function"].as_array().cloned().unwrap_or_default();
        let toml = match manifest_toml(&functions) {
            Ok(t) => t,
            Err(why) => {
                skipped.push(format!("{id}: {why}"));
                continue;
            }
        };
        let manifest = agentd_policy::parse(&format!("bfcl/{id}.toml"), &toml)
            .map_err(|d| format!("the manifest made for {id} does not parse (a bug):\n{d}\n{toml}"))?;
        // The user turns of the (single-turn) conversation.
        let task = q["question"][0]
            .as_array()
            .map(|m| m.iter().filter(|m| m["role"] == "user").filter_map(|m| m["content"].as_str()).collect::<Vec<_>>())
            .unwrap_or_default()
            .join("\n");
        out.push(Question { id, category: category.to_string(), task, manifest });
    }
    Ok((out, skipped))
}

/// A value as the call grammar writes it, as JSON for the checker.
fn json_value(kind: &ArgKind, text: &str) -> Value {
    match kind {
        ArgKind::String { .. } | ArgKind::Path { .. } => Value::from(text),
        // As the model wrote it: `2` stays an integer, for BFCL's checker to judge (it takes
        // an integer for a float parameter at the top level, not inside lists).
        ArgKind::Number { .. } if !text.contains('.') => serde_json::from_str(text).unwrap_or(Value::Null),
        ArgKind::Number { .. } => text.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
        ArgKind::List { items, .. } => {
            let vals = kind.items_of(text).unwrap_or_default();
            Value::Array(vals.iter().map(|v| json_value(items, v)).collect())
        }
        _ => serde_json::from_str(text).unwrap_or(Value::Null),
    }
}

/// A grammar call as `{tool: {arg: value}}`.
fn call_json(g: &CallGrammar, call: &ParsedCall) -> Value {
    let kinds = g.args_of(&call.tool).unwrap_or_default();
    let args: Map<String, Value> =
        kinds.iter().filter_map(|(n, k)| call.args.get(n).map(|v| (n.clone(), json_value(k, v)))).collect();
    json!({ call.tool.clone(): args })
}

/// A JSON value as the text a call carries for an argument.
fn arg_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) | Value::Array(_) => Some(v.to_string()),
        _ => None,
    }
}

/// Whether a free call would pass `agentd exec`'s checks: a granted tool, known arguments,
/// each in bounds, none required missing.
fn policy_accepts(m: &Manifest, tool: &str, args: &Map<String, Value>) -> bool {
    let Some(t) = Name::parse(tool).ok().and_then(|n| m.tools.get(&n)) else { return false };
    let known = args.keys().all(|k| t.args.iter().any(|a| a.name.as_str() == k));
    known
        && t.args.iter().all(|a| match args.get(a.name.as_str()) {
            None => a.optional,
            Some(v) => arg_text(v).is_some_and(|s| a.kind.check(&s).is_ok()),
        })
}

/// Reads a free reply: a `<tool_call>` block holding `{"name": ..., "arguments": {...}}`. A
/// call-shaped object outside that block (small models write `<tool_result>` instead) is an
/// invalid call, not an answer.
fn read_free(m: &Manifest, text: &str) -> (&'static str, Value, bool) {
    let Some(at) = text.find(turn::CALL_OPEN.trim_end()) else {
        let stray = text.match_indices('{').any(|(i, _)| {
            let first = serde_json::Deserializer::from_str(&text[i..]).into_iter::<Value>().next();
            matches!(first, Some(Ok(Value::Object(o))) if o.contains_key("name"))
        });
        return (if stray { "invalid" } else { "none" }, Value::Null, false);
    };
    let rest = &text[at + turn::CALL_OPEN.trim_end().len()..];
    let body = rest.split(turn::CALL_CLOSE.trim_start()).next().unwrap_or_default().trim();
    let first = serde_json::Deserializer::from_str(body).into_iter::<Value>().next();
    let Some(Ok(Value::Object(o))) = first else { return ("invalid", Value::Null, false) };
    match (o.get("name").and_then(Value::as_str), o.get("arguments").and_then(Value::as_object)) {
        (Some(name), Some(args)) => ("call", json!({ name: args }), policy_accepts(m, name, args)),
        _ => ("invalid", Value::Null, false),
    }
}

fn run_question(local: &mut Local<'_>, q: &Question) -> Result<[Emitted; 2], String> {
    let tools = Offered::of_manifest(&q.manifest);
    let g = CallGrammar::of(&tools);
    let system = prompt::system(q.manifest.agent.name.as_str(), &tools, &g, false);
    let example = prompt::example(&tools, &g);
    local.begin(&system, example.as_deref(), &q.task).map_err(|e| e.to_string())?;
    let start = local.snapshot();
    let cfg = RunConfig { max_steps: 1, max_tokens: REPLY_TOKENS, ..RunConfig::GREEDY };
    let (outcome, _) = local.turn(&Rules::free(&g), &cfg, REPLY_TOKENS, &mut Silent).map_err(|e| e.to_string())?;
    let constrained = match outcome {
        Outcome::Call(call, text) => {
            let c = call_json(&g, &call);
            (("call", c, true), text)
        }
        Outcome::Answer(_, text) => (("none", Value::Null, false), text),
        Outcome::Budget(text) => (("invalid", Value::Null, false), text),
    };
    local.restore(&start).map_err(|e| e.to_string())?;
    let (free_text, _) = local.unconstrained(REPLY_TOKENS).map_err(|e| e.to_string())?;
    let free = read_free(&q.manifest, &free_text);
    let emitted = |mode, (kind, call, policy_valid): (&'static str, Value, bool), text: String| Emitted {
        id: q.id.clone(),
        category: q.category.clone(),
        mode,
        kind,
        call,
        policy_valid,
        text,
    };
    Ok([emitted("constrained", constrained.0, constrained.1), emitted("free", free, free_text)])
}

/// Runs BFCL's checker over `emitted`.
fn score(suite: &Path, emitted: &[Emitted]) -> Result<Vec<bool>, String> {
    let file = std::env::temp_dir().join(format!("agentd-bfcl-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(emitted).map_err(|e| e.to_string())?)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let out = Command::new("python3").arg("-c").arg(SCORER).arg(suite).arg(&file).output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| format!("running python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("BFCL's checker failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let verdicts: Vec<Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("reading the checker's verdicts: {e}"))?;
    Ok(verdicts.iter().map(|v| v["valid"].as_bool().unwrap_or(false)).collect())
}

pub(crate) fn run(model: Option<PathBuf>, categories: &[String], limit: usize, json_out: bool) -> Result<(), String> {
    for c in categories {
        if !CATEGORIES.contains(&c.as_str()) {
            return Err(format!(
                "category {c:?} is not supported (supported: {}; parallel ones ask for several calls in one turn, \
                 and agentd's protocol makes one)",
                CATEGORIES.join(", ")
            ));
        }
    }
    let suite = fetch::bfcl_suite().map_err(|e| e.to_string())?;
    let path = match model {
        Some(p) => p,
        None => fetch::embedded_model().map_err(|e| e.to_string())?,
    };
    let mut llm = Llm::load(&path).map_err(|e| e.to_string())?;
    let mut local = Local::new(&mut llm, None);
    let mut all = Vec::new();
    let mut skipped = BTreeMap::new();
    for c in categories {
        let (qs, skip) = questions(&suite, c, limit)?;
        skipped.insert(c.clone(), skip);
        all.extend(qs);
    }
    let started = Instant::now();
    let mut emitted = Vec::new();
    for (i, q) in all.iter().enumerate() {
        let [a, b] = run_question(&mut local, q)?;
        eprintln!(
            "agentd: bench bfcl [{}/{}] {}: constrained {}, free {} ({:.0} s)",
            i + 1,
            all.len(),
            q.id,
            a.kind,
            b.kind,
            started.elapsed().as_secs_f64()
        );
        emitted.extend([a, b]);
    }
    let verdicts = score(&suite, &emitted)?;
    let mut tallies: BTreeMap<(String, &str), Tally> = BTreeMap::new();
    for (e, ok) in emitted.iter().zip(&verdicts) {
        let t = tallies.entry((e.category.clone(), e.mode)).or_default();
        t.questions += 1;
        t.format_valid += usize::from(e.kind == "call");
        t.policy_valid += usize::from(e.policy_valid);
        t.correct += usize::from(*ok);
    }
    let seconds = started.elapsed().as_secs_f64();
    if json_out {
        let rows: Vec<Value> =
            tallies.iter().map(|((c, m), t)| json!({ "category": c, "mode": m, "tally": t })).collect();
        let report = json!({
            "suite": fetch::BFCL_PACKAGE, "model": path.display().to_string(), "seconds": seconds,
            "results": rows, "skipped": skipped, "emitted": emitted,
        });
        outln!("{report}");
        return Ok(());
    }
    outln!("BFCL v4 ({}), model {}, {:.0} s", fetch::BFCL_PACKAGE, path.display(), seconds);
    outln!("{:<14} {:>4}  {:>24}  {:>24}", "category", "n", "constrained decoding", "free decoding");
    for c in categories {
        let get =
            |m: &str| tallies.get(&(c.clone(), m)).map(|t| (t.questions, t.format_valid, t.policy_valid, t.correct));
        let (Some(a), Some(b)) = (get("constrained"), get("free")) else { continue };
        let cell = |(n, f, p, ok): (usize, usize, usize, usize)| {
            if c == "irrelevance" {
                format!("refused {:5.1}%", Tally::pct(ok, n))
            } else {
                format!("{:5.1}% {:5.1}% {:5.1}%", Tally::pct(f, n), Tally::pct(p, n), Tally::pct(ok, n))
            }
        };
        outln!("{c:<14} {:>4}  {:>24}  {:>24}", a.0, cell(a), cell(b));
        let skip = &skipped[c];
        if !skip.is_empty() {
            outln!("  skipped {} (not expressible as a manifest), e.g. {}", skip.len(), skip[0]);
        }
    }
    outln!("columns: format-valid, policy-valid, accurate (BFCL's AST checker); irrelevance: no call made");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions() -> Vec<Value> {
        serde_json::from_str(
            r#"[{"name": "geo.distance", "description": "Distance.", "parameters": {"type": "dict",
                "properties": {
                    "points": {"type": "array", "items": {"type": "float"}, "description": "coords"},
                    "unit": {"type": "string", "enum": ["km", "mi"], "description": "unit", "default": "km"},
                    "round": {"type": "boolean", "description": "round it"},
                    "legs": {"type": "integer", "description": "legs"}},
                "required": ["points", "legs"]}}]"#,
        )
        .expect("json")
    }

    #[test]
    fn function_definitions_become_a_manifest_the_grammar_holds_to() {
        let toml = manifest_toml(&functions()).expect("expressible");
        let m = agentd_policy::parse("t.toml", &toml).unwrap_or_else(|d| panic!("{d}\n{toml}"));
        let tool = m.tools.values().next().expect("one tool");
        assert_eq!(m.tools.keys().next().map(Name::as_str), Some("geo_distance"));
        let by_name = |n: &str| tool.args.iter().find(|a| a.name.as_str() == n).expect("arg");
        assert!(
            matches!(&by_name("points").kind, ArgKind::List { items, .. } if matches!(**items, ArgKind::Number { .. }))
        );
        assert!(matches!(&by_name("unit").kind, ArgKind::String { one_of, .. } if one_of == &["km", "mi"]));
        assert!(by_name("unit").description.contains("Default: \"km\""));
        assert!(by_name("round").optional && !by_name("legs").optional);

        let g = CallGrammar::new(&m);
        let call = g
            .parse(r#"{"name": "geo_distance", "arguments": {"legs": 2, "points": [1.5, 2], "unit": "mi"}}"#)
            .expect("a valid call in argv order");
        assert_eq!(call_json(&g, &call), json!({"geo_distance": {"legs": 2, "points": [1.5, 2], "unit": "mi"}}));
        assert!(g.parse(r#"{"name": "geo_distance", "arguments": {"legs": 2, "points": [], "unit": "ft"}}"#).is_none());
    }

    #[test]
    fn inexpressible_functions_are_named() {
        let dict = json!([{"name": "f", "parameters": {"properties": {"opts": {"type": "dict"}}}}]);
        let err = manifest_toml(dict.as_array().expect("array")).expect_err("dict");
        assert!(err.contains("\"opts\"") && err.contains("dict"), "{err}");
        let bad = json!([{"name": "1f", "parameters": {"properties": {}}}]);
        assert!(manifest_toml(bad.as_array().expect("array")).is_err());
    }

    #[test]
    fn free_replies_are_read_as_calls_answers_or_invalid() {
        let m = agentd_policy::parse("t.toml", &manifest_toml(&functions()).expect("toml")).expect("manifest");
        let ok = "Thought: x\n<tool_call>\n{\"name\": \"geo_distance\", \"arguments\": {\"points\": [1], \"legs\": 1}}\n</tool_call>";
        let (kind, call, policy) = read_free(&m, ok);
        assert_eq!((kind, policy), ("call", true));
        assert_eq!(call, json!({"geo_distance": {"points": [1], "legs": 1}}));
        let (kind, _, policy) = read_free(&m, "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}");
        assert_eq!((kind, policy), ("call", false), "well-formed, but not granted");
        assert_eq!(read_free(&m, "<tool_call>\n{\"name\": ").0, "invalid");
        assert_eq!(read_free(&m, "<tool_result>\n{\"name\": \"geo_distance\"}\n</tool_result>").0, "invalid");
        assert_eq!(read_free(&m, "Answer: 42 km").0, "none");
    }
}
