//! The agent loop: generate a turn under the protocol's constraints; on a tool call, pause,
//! run it in the sandbox, append its result, and resume from the KV cache; stop on an
//! answer, `max_steps` or the token budget.

use std::time::{Duration, Instant};

use agentd_policy::grammar::{CallGrammar, Offered, ParsedCall};
use serde::Serialize;
use serde_json::Value;

use agentd_memory::Source;
use agentd_model::engine::{Engine, Observer, Outcome, RunConfig};
use agentd_model::llm::Counters;
use agentd_model::quote::Quotes;
use agentd_model::turn::Rules;
use agentd_model::weights::ModelInfo;
use agentd_model::{prompt, turn, AgentError};
use agentd_policy::AnswerMode;

/// An agent's long-term memory as the loop uses it (`agentd run --memory`).
pub trait Recall {
    /// Stored items relevant to `query` that this run has not been shown yet, as blocks for
    /// the model (empty if none).
    fn recall(&mut self, query: &str) -> Result<String, AgentError>;
    /// Stores `text`, with where it came from.
    fn remember(&mut self, text: &str, source: Source) -> Result<(), AgentError>;
}

/// Tokens kept free for the next reply when the context budget is checked.
const REPLY_RESERVE: usize = 256;

/// One message of the transcript.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: &'static str,
    /// Its text.
    pub content: String,
}

/// One tool call of the transcript.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCall {
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub arguments: std::collections::BTreeMap<String, String>,
    /// The full `agentd exec --json` result.
    pub result: Value,
    /// Tokens in the context before the result was added.
    pub context_before: usize,
    /// Tokens the result added: all the model processed to resume.
    pub resume_tokens: usize,
}

/// Why the loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The model gave its final answer.
    Answer,
    /// `max_steps` turns passed without one.
    MaxSteps,
    /// The token budget ran out.
    Budget,
}

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct Transcript {
    /// The conversation.
    pub messages: Vec<Message>,
    /// Every tool call, with its result.
    pub tool_calls: Vec<ToolCall>,
    /// The final answer, if one was given.
    pub answer: Option<String>,
    /// Why it stopped.
    pub stop: Stop,
    /// Assistant turns taken.
    pub steps: usize,
    /// Tokens of the opening prompt.
    pub prompt_tokens: usize,
    /// What the model processed.
    pub counters: Counters,
    /// Prefill tokens per second.
    pub prefill_tps: f64,
    /// Decode tokens per second.
    pub decode_tps: f64,
    /// Wall time of the run, in milliseconds.
    pub duration_ms: u64,
    /// Calls whose results were paged out of the context (to memory) to stay in budget.
    pub paged_out: Vec<String>,
    /// The model.
    pub model: ModelInfo,
}

/// Who the agent is, and the tools it is offered: the manifest's own, and those of its MCP
/// servers that could be offered.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Its name.
    pub name: String,
    /// Its tools.
    pub tools: Vec<Offered>,
    /// What its answer may be (the manifest's `agent.answer`).
    pub answer: AnswerMode,
}

impl Agent {
    /// `manifest`'s agent with the manifest's own tools.
    pub fn of_manifest(manifest: &agentd_policy::Manifest) -> Self {
        Self {
            name: manifest.agent.name.to_string(),
            tools: Offered::of_manifest(manifest),
            answer: manifest.agent.answer,
        }
    }
}

/// Runs `task` for `agent` on `engine`; `exec` runs one tool call in its sandbox.
/// With `memory`, the task, every tool result and the answer are stored as they come, items
/// relevant to each step are recalled at the end of the prompt, and results that no longer
/// fit the context budget are paged out (they are already in memory).
pub fn run(
    engine: &mut dyn Engine,
    agent: &Agent,
    task: &str,
    cfg: &RunConfig,
    exec: &mut dyn FnMut(&ParsedCall, &str) -> Value,
    obs: &mut dyn Observer,
    mut memory: Option<&mut dyn Recall>,
) -> Result<Transcript, AgentError> {
    let started = Instant::now();
    let grammar = CallGrammar::of(&agent.tools);
    let mut system = prompt::system(&agent.name, &agent.tools, &grammar, memory.is_some());
    if agent.answer == AnswerMode::Quote {
        system.push_str(prompt::QUOTED_ANSWER);
    }
    // Recalled memory goes at the end of the prompt, after the task: never in the middle.
    let opening_task = match memory.as_deref_mut() {
        Some(m) => {
            let recalled = m.recall(task)?;
            m.remember(task, Source::Task)?;
            if recalled.is_empty() {
                prompt::seal(task)
            } else {
                format!("{}\n\n{recalled}", prompt::seal(task))
            }
        }
        None => prompt::seal(task),
    };
    let mut messages = vec![
        Message { role: "system", content: system.clone() },
        Message { role: "user", content: prompt::plain(&opening_task) },
    ];
    let example = prompt::example(&agent.tools, &grammar);
    let prompt_tokens = engine.begin(&system, example.as_deref(), &opening_task)?;
    // What the opening holds, as the engine counts the context (servers report no prefill).
    let opening_tokens = engine.context_tokens();
    let budget = match (cfg.context_budget, engine.info().context) {
        (0, model) => model,
        (b, 0) => b,
        (b, model) => b.min(model),
    };
    let mut generated = 0usize;
    let mut tool_calls = Vec::new();
    // The context's calls, oldest first: (assistant turn, result block, call id).
    // Each result the model has in its context: its turn's text, the result block, the call
    // id, and the call's number as the model sees it.
    let mut l1: Vec<(String, String, String, String)> = Vec::new();
    let mut paged_out = Vec::new();
    let mut answer = None;
    let mut stop = Stop::MaxSteps;
    let mut steps = 0;
    // What the tools printed, as the model was shown it: what a quoted answer may copy. The
    // loop keeps it, not the engine, so that paging, recalled memory and a backend that does
    // not hold a model to it change nothing.
    let mut printed: Vec<String> = Vec::new();
    while steps < cfg.max_steps {
        steps += 1;
        let quotes = (agent.answer == AnswerMode::Quote).then(|| Quotes::new(printed.iter().map(String::as_str)));
        let rules = Rules { calls: &grammar, quotes: quotes.as_ref() };
        // A reply may not overrun the context budget either: it ends as a budget stop.
        let room = if budget == 0 { usize::MAX } else { budget.saturating_sub(engine.context_tokens()) };
        let (outcome, n) = engine.turn(&rules, cfg, cfg.max_tokens.saturating_sub(generated).min(room), obs)?;
        generated += n;
        let (call, text) = match outcome {
            Outcome::Budget(text) => {
                messages.push(Message { role: "assistant", content: text });
                stop = Stop::Budget;
                break;
            }
            Outcome::Answer(a, text) => {
                // Every engine is held to the quotes; this is the last line of defence.
                if !quotes.as_ref().is_none_or(|q| !a.is_empty() && q.holds(a.as_bytes())) {
                    return Err(AgentError::Model(format!(
                        "the answer {a:?} is not copied from what the tools printed (agent.answer = \"quote\")"
                    )));
                }
                if let Some(m) = memory.as_deref_mut() {
                    m.remember(&a, Source::Model)?;
                }
                messages.push(Message { role: "assistant", content: text });
                answer = Some(a);
                stop = Stop::Answer;
                break;
            }
            Outcome::Call(call, text) => (call, text),
        };
        messages.push(Message { role: "assistant", content: format!("{text}{}", turn::CALL_CLOSE) });
        let call_id = uuid::Uuid::now_v7().to_string();
        engine.pause(&call.tool);
        obs.tool_start(&call, &call_id);
        let result = exec(&call, &call_id);
        obs.tool_end(&result);
        let out = |k: &str| result[k].as_str().unwrap_or_default().to_string();
        printed.extend(prompt::shown_output(&out("stdout"), &out("stderr")));
        // The model sees the call's number in this run, not its id: an id is new every run
        // (time and randomness), and a greedy model's next tokens would differ with it, so
        // that the same task over the same data could be answered differently each time.
        let shown = (tool_calls.len() + 1).to_string();
        let mut block = prompt::tool_result(
            &shown,
            &call.tool,
            result["exit_code"].as_i64().unwrap_or(-1),
            &out("stdout"),
            &out("stderr"),
            result["events"]["denied"].as_u64().unwrap_or(0),
        );
        if let Some(m) = memory.as_deref_mut() {
            // Recall for the next step first (so the result does not recall itself), then
            // store the result whole: the block shows the model a cut, and paging may drop it.
            // What is recalled is chosen by trusted words only (the task, and the tool the
            // model chose), never by what the tool printed.
            let recalled = m.recall(&format!("{task}\n{}", call.tool))?;
            let mut stored = format!("{} exited {}:\n{}", call.tool, result["exit_code"], out("stdout"));
            if !out("stderr").trim().is_empty() {
                stored.push_str(&format!("\n[stderr]\n{}", out("stderr")));
            }
            let denied = result["events"]["denied"].as_u64().unwrap_or(0);
            if denied > 0 {
                stored.push_str(&format!("\n[{denied} actions denied by the sandbox]"));
            }
            m.remember(&stored, Source::Tool { call_id: call_id.clone(), tool: call.tool.clone() })?;
            if !recalled.is_empty() {
                block = format!("{block}\n{recalled}");
            }
        }
        let context_before = engine.context_tokens();
        let fits = budget == 0 || context_before + engine.count(&block)? + REPLY_RESERVE <= budget;
        let resumed = if fits {
            Some(engine.resume(&block)?.1)
        } else if memory.is_none() {
            tracing::warn!(budget, context = context_before, "the context budget is full and there is no memory");
            None
        } else {
            page_out(engine, &mut l1, &mut paged_out, opening_tokens, budget, &text, &block)?
                .then(|| {
                    let mut turns: Vec<(String, String)> = l1.iter().map(|(t, b, ..)| (t.clone(), b.clone())).collect();
                    turns.push((text.clone(), block.clone()));
                    engine.rebuild(&system, example.as_deref(), &opening_task, &turns)
                })
                .transpose()?
        };
        messages.push(Message { role: "tool", content: prompt::plain(&block) });
        tool_calls.push(ToolCall {
            tool: call.tool.clone(),
            arguments: call.args.clone(),
            result,
            context_before,
            resume_tokens: resumed.unwrap_or(0),
        });
        if resumed.is_none() {
            // The result is in the transcript (and in memory, if any); the model cannot read it.
            stop = Stop::Budget;
            break;
        }
        l1.push((text, block, call_id, shown));
    }
    let counters = engine.counters();
    Ok(Transcript {
        messages,
        tool_calls,
        answer,
        stop,
        steps,
        prompt_tokens,
        counters,
        prefill_tps: counters.prefill_tps(),
        decode_tps: counters.decode_tps(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        paged_out,
        model: engine.info(),
    })
}

/// Pages out the oldest results of `l1` (each already in memory) to markers, down to three
/// quarters of `budget`, so that the next steps do not each rebuild the context, with room
/// for `text` and `block` after them. Changes nothing and returns false if even that does
/// not fit.
fn page_out(
    engine: &dyn Engine,
    l1: &mut [(String, String, String, String)],
    paged_out: &mut Vec<String>,
    opening_tokens: usize,
    budget: usize,
    text: &str,
    block: &str,
) -> Result<bool, AgentError> {
    let mut sizes = Vec::new();
    for (t, b, ..) in l1.iter() {
        sizes.push(engine.count(t)? + engine.count(b)?);
    }
    let mut total = opening_tokens + sizes.iter().sum::<usize>() + engine.count(text)? + engine.count(block)?;
    let mut plan = Vec::new();
    for (i, (_, b, _, shown)) in l1.iter().enumerate() {
        if total + REPLY_RESERVE <= budget * 3 / 4 {
            break;
        }
        if b.starts_with(prompt::PAGED_OUT) {
            continue;
        }
        let marker = format!("{} call_id=\"{shown}\"/>", prompt::PAGED_OUT);
        total = total - sizes[i] + engine.count(&marker)?;
        plan.push((i, marker));
    }
    if total + REPLY_RESERVE > budget {
        return Ok(false);
    }
    for (i, marker) in plan {
        paged_out.push(l1[i].2.clone());
        l1[i].1 = marker;
    }
    Ok(true)
}

/// A call's result in words: `ok`, `ok, with denials`, `refused` or `failed`; and, for a
/// call in an MCP server's session sandbox, whose denials are known only when the sandbox
/// ends, `ok, denials unknown`.
pub fn verdict(r: &Value) -> &'static str {
    match (r["exit_code"].as_i64(), succeeded(r), r["events"]["denied"].as_u64().unwrap_or(0)) {
        (_, true, 0) if r["mcp"]["verdict"] == "unknown" => "ok, denials unknown",
        (_, true, 0) => "ok",
        (_, true, _) => "ok, with denials",
        (Some(125), _, _) if r["error"].is_string() => "refused",
        _ => "failed",
    }
}

/// Whether a call's result (an `agentd exec --json` object) is a success: its `ok`, which
/// holds the tool's `ok_exit`; exit 0 for results made elsewhere (an MCP server's call).
pub fn succeeded(r: &Value) -> bool {
    r["ok"].as_bool().unwrap_or(r["exit_code"].as_i64() == Some(0))
}

/// Time spent in tool calls, for summaries.
pub fn tool_time(t: &Transcript) -> Duration {
    Duration::from_millis(t.tool_calls.iter().map(|c| c.result["duration_ms"].as_u64().unwrap_or(0)).sum())
}
