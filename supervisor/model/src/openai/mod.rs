//! `--backend openai`: the same loop, protocol and sandbox, with a model behind an
//! OpenAI-compatible chat completions endpoint (llama.cpp's server, vLLM, Ollama).
//!
//! Each turn is sent with a constraint in the strongest form the server takes ([`forms`]):
//! a grammar of the turn automaton and call grammar where the server takes one, so its
//! model cannot write an ungranted tool or an argument out of bounds, any more than the
//! in-process one can. Whatever form, each reply is still read by the same automaton before
//! anything runs: a reply that does not follow it never runs, and the model is told what was
//! wrong and asked again (twice at most). Replies are streamed (server-sent events) and shown
//! as they come.

mod forms;
mod sse;

use std::time::{Duration, Instant};

use agentd_policy::grammar::{CallGrammar, Offered, ParsedCall};
use agentd_policy::schema::{args_from_json_text, json_of_args};
use serde_json::{json, Value};

pub use forms::{turn_schema, Constraints, Form, GrammarField, SchemaField};

use crate::engine::{Engine, Observer, Outcome, RunConfig};
use crate::llm::Counters;
use crate::prompt;
use crate::turn::{self, Rules, Turn};
use crate::weights::ModelInfo;
use crate::AgentError;

/// Replies that broke the protocol before the run gives up.
const RETRIES: usize = 2;

/// A chat completions endpoint.
pub struct Remote {
    agent: ureq::Agent,
    url: String,
    model: String,
    key: Option<String>,
    messages: Vec<Value>,
    counters: Counters,
    want: Constraints,
    form: Option<Form>,
    /// What the model is offered, and their function names for native tools.
    tools: Vec<Offered>,
    native: Vec<String>,
    calls: CallGrammar,
    /// The id of the native call whose result comes next.
    pending: Option<String>,
    next_id: usize,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("url", &self.url)
            .field("model", &self.model)
            .field("form", &self.form)
            .finish_non_exhaustive()
    }
}

/// Why a request got no usable reply.
enum Failure {
    /// The server refused the request as such (a status like 400, 404, 422, or 500 from a
    /// server that fails on a field it does not take; or a reply that is not a completion):
    /// for a probe, the form is not taken.
    Refused(String),
    /// It could not be reached, or is not serving now (401, 403, 429, 502-504): an error,
    /// never read as a form not taken.
    Unavailable(String),
}

/// Statuses that say the server is not serving this client now, whatever the request.
const UNAVAILABLE: [u16; 6] = [401, 403, 429, 502, 503, 504];

/// Most bytes of a refused reply sent back to the model.
const REFUSED_SHOWN: usize = 2000;

impl Remote {
    /// `endpoint` is the API base (`http://127.0.0.1:8080/v1`); the key comes from
    /// `$OPENAI_API_KEY` if set. Constraints are found out on first use
    /// ([`Remote::constraints`] to choose).
    pub fn new(endpoint: &str, model: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(300)))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            agent,
            url: format!("{}/chat/completions", endpoint.trim_end_matches('/')),
            model: model.to_string(),
            key: std::env::var("OPENAI_API_KEY").ok(),
            messages: Vec::new(),
            counters: Counters::default(),
            want: Constraints::Auto,
            form: None,
            tools: Vec::new(),
            native: Vec::new(),
            calls: CallGrammar::of(&[]),
            pending: None,
            next_id: 0,
        }
    }

    /// Which constraint to send (default: the strongest the server takes).
    pub fn constraints(mut self, want: Constraints) -> Self {
        self.want = want;
        self.form = None;
        self
    }

    /// The tools the run offers (the same the loop's call grammar is built from): native
    /// tools and JSON schemas are made of them.
    pub fn offer(&mut self, tools: &[Offered]) {
        self.tools = tools.to_vec();
        self.native = forms::native_names(tools);
        self.calls = CallGrammar::of(tools);
    }

    /// The form of constraint this server takes, found once: each form allowed is tried
    /// with a request only a constrained model answers right, strongest first.
    pub fn resolve(&mut self) -> Result<Form, AgentError> {
        if let Some(f) = self.form {
            return Ok(f);
        }
        let mut tried = Vec::new();
        let mut found = None;
        for form in Form::candidates(self.want) {
            if form == Form::None {
                found = Some(form);
                break;
            }
            match self.post(&form.probe(&self.model), &mut |_| {}) {
                Ok(r) => {
                    let call = r.call.as_ref().map(|c| (c.name.as_str(), c.arguments.as_str()));
                    if form.probe_passed(&r.content, call) {
                        found = Some(form);
                        break;
                    }
                    tried.push(format!("{form}: not held to it"));
                }
                Err(Failure::Refused(why)) => tried.push(format!("{form}: {why}")),
                Err(Failure::Unavailable(why)) => return Err(AgentError::Model(why)),
            }
            tracing::debug!(form = %form, "server constraint not taken");
        }
        let form = match (found, self.want) {
            (Some(f), _) => f,
            (None, Constraints::Auto) => Form::None,
            (None, want) => {
                return Err(AgentError::Model(format!(
                    "{} does not take --server-constraints {}: {}",
                    self.url,
                    want.name(),
                    tried.join("; ")
                )))
            }
        };
        tracing::info!(url = %self.url, form = %form, "server constraints");
        self.form = Some(form);
        Ok(form)
    }

    fn post(&self, body: &Value, on_text: &mut dyn FnMut(&str)) -> Result<sse::Reply, Failure> {
        let mut req = self.agent.post(&self.url);
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut resp = req.send_json(body).map_err(|e| Failure::Unavailable(format!("{}: {e}", self.url)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            let text: String = text.chars().take(300).collect();
            let why = format!("{} answered {status}: {text}", self.url);
            return Err(if UNAVAILABLE.contains(&status.as_u16()) {
                Failure::Unavailable(why)
            } else {
                Failure::Refused(why)
            });
        }
        let streamed = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        sse::read(resp.into_body().into_reader(), streamed, on_text)
            .map_err(|e| Failure::Refused(format!("{}: {e}", self.url)))
    }

    /// One reply to the conversation so far, held to `rules` as the form allows.
    fn complete(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        max_tokens: usize,
        obs: &mut dyn Observer,
    ) -> Result<sse::Reply, AgentError> {
        let form = self.resolve()?;
        let mut body = json!({
            "model": self.model,
            "messages": self.messages,
            "max_tokens": max_tokens.clamp(1, 1024),
            "temperature": if cfg.seed.is_some() { cfg.temperature } else { 0.0 },
            "stop": [turn::CALL_CLOSE, "<|im_end|>"],
        });
        if let Some(seed) = cfg.seed {
            body["seed"] = json!(seed);
        }
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let answer = rules.quotes.is_none_or(|q| !q.is_empty());
        let grammar = matches!(form, Form::Grammar(_)).then(|| turn::gbnf(rules)).flatten();
        form.apply(&mut body, grammar.as_deref(), &self.tools, &self.native, answer);
        let started = Instant::now();
        // JSON and native calls are shown as the turn they stand for, once read.
        let raw = matches!(form, Form::Grammar(_) | Form::None);
        let r = match self.post(&body, &mut |t| {
            if raw {
                obs.text(t)
            }
        }) {
            Ok(r) => r,
            Err(Failure::Refused(why) | Failure::Unavailable(why)) => return Err(AgentError::Model(why)),
        };
        let estimate = self.context_tokens() as u64;
        let c = &mut self.counters;
        // A server's counts are its word: kept within what was asked, and never wrapped.
        c.prefill_tokens = c.prefill_tokens.saturating_add(r.prompt_tokens.unwrap_or(estimate).min(1 << 32));
        c.prefills += 1;
        c.decode_tokens =
            c.decode_tokens.saturating_add(r.completion_tokens.unwrap_or(r.chunks).min(max_tokens as u64));
        c.decode_time += started.elapsed();
        Ok(r)
    }

    /// A reply as the text protocol's turn, as the form has it written.
    fn turn_text(&self, form: Form, r: &sse::Reply) -> Result<String, String> {
        match form {
            Form::Grammar(_) | Form::None => Ok(r.content.clone()),
            Form::JsonSchema(_) => {
                let v: Value = serde_json::from_str(&escape_controls(r.content.trim()))
                    .map_err(|e| format!("the reply is not JSON ({e})"))?;
                if let Some(a) = v.get("answer") {
                    return a
                        .as_str()
                        .map(|a| format!("{}{a}", turn::ANSWER))
                        .ok_or_else(|| "the answer is not text".into());
                }
                let name = v["name"].as_str().ok_or("the reply names no tool and gives no answer")?;
                let args = v.get("arguments").map(Value::to_string).unwrap_or_else(|| "{}".into());
                self.call_text(name, &args)
            }
            Form::Tools => match &r.call {
                Some(c) => {
                    let tool = self
                        .native
                        .iter()
                        .position(|n| *n == c.name)
                        .map(|i| self.tools[i].name.clone())
                        .ok_or_else(|| format!("the reply calls {:?}, which is not offered", c.name))?;
                    let args =
                        if c.arguments.trim().is_empty() { "{}".to_string() } else { escape_controls(&c.arguments) };
                    self.call_text(&tool, &args)
                }
                // Plain text is the answer, unless it is a turn of the text protocol.
                None => {
                    let t = r.content.trim_start();
                    if [turn::THOUGHT, turn::CALL_OPEN, turn::ANSWER].iter().any(|o| t.starts_with(o.trim_end())) {
                        Ok(t.to_string())
                    } else {
                        Ok(format!("{}{}", turn::ANSWER, t.trim()))
                    }
                }
            },
        }
    }

    /// The text protocol's call of `tool` with `args` (a JSON object's text), in the call
    /// grammar's layout, for the automaton to read.
    fn call_text(&self, tool: &str, args: &str) -> Result<String, String> {
        let values = args_from_json_text(args).map_err(|e| e.to_string())?;
        let kinds =
            self.calls.args_of(tool).ok_or_else(|| format!("the reply calls {tool:?}, which is not offered"))?;
        if let Some(extra) = values.keys().find(|k| !kinds.iter().any(|(n, _)| n == *k)) {
            return Err(format!("{tool} takes no argument {extra:?}"));
        }
        // Each value as its kind: a string where a number goes could otherwise be written
        // into the call as JSON of its own (`"3, \"force\": true"`).
        for (name, kind) in kinds {
            if let Some(v) = values.get(name) {
                kind.check(v).map_err(|e| format!("argument {name:?} {e}"))?;
            }
        }
        let call = ParsedCall { tool: tool.to_string(), args: values };
        Ok(format!("{}{}", turn::CALL_OPEN, CallGrammar::render(&call, kinds)))
    }

    /// The call a text-protocol turn makes, if it makes one (for turns given as text: the
    /// worked example, and the turns kept when the context is rebuilt).
    fn call_in(&self, kept: &str) -> Option<ParsedCall> {
        match read_turn(&Rules::free(&self.calls), kept) {
            Ok(Outcome::Call(call, _)) => Some(call),
            _ => None,
        }
    }

    /// The assistant message that stands for a read turn `kept` (making `call`, if any) in
    /// the form the server speaks: the text protocol, a JSON object, or a native call.
    fn assistant(&mut self, kept: &str, call: Option<&ParsedCall>) -> Value {
        let form = self.form.unwrap_or(Form::None);
        let (_, answer) = turn::answer_in(kept);
        let sealed = |t: &str| prompt::for_server(&prompt::seal(t));
        let kinds = call.and_then(|c| self.calls.args_of(&c.tool));
        match (form, call.zip(kinds)) {
            // A call turn ends as the worked example's and the local engine's do.
            (Form::Grammar(_) | Form::None, Some(_)) => {
                let text = format!("{}{}", kept.trim_end_matches(turn::CALL_CLOSE), turn::CALL_CLOSE);
                json!({"role": "assistant", "content": prompt::reply_for_server(&text)})
            }
            (Form::Grammar(_) | Form::None, None) => {
                json!({"role": "assistant", "content": prompt::reply_for_server(kept)})
            }
            (Form::JsonSchema(_), Some((c, kinds))) => {
                json!({"role": "assistant", "content": json_text(&CallGrammar::render(c, kinds))})
            }
            (Form::JsonSchema(_), None) => {
                json!({"role": "assistant", "content": json_text(&json!({"answer": answer}).to_string())})
            }
            (Form::Tools, Some((c, _))) => {
                let id = format!("call_{}", self.next_id);
                self.next_id += 1;
                self.pending = Some(id.clone());
                let at = self.tools.iter().position(|t| t.name == c.tool);
                let args = at
                    .and_then(|i| json_of_args(&self.tools[i].args, &c.args).ok())
                    .map_or_else(|| "{}".to_string(), |m| json_text(&Value::Object(m).to_string()));
                let name = at.map_or(c.tool.clone(), |i| self.native[i].clone());
                // An empty content, not null: llama-cpp-python refuses null.
                json!({"role": "assistant", "content": "", "tool_calls": [
                    {"id": id, "type": "function", "function": {"name": name, "arguments": args}}]})
            }
            (Form::Tools, None) => json!({"role": "assistant", "content": sealed(answer)}),
        }
    }
}

/// A JSON text with the control characters inside its strings escaped: llama.cpp's JSON
/// grammars let a model write a raw newline in a string, which JSON does not allow.
fn escape_controls(text: &str) -> String {
    escape_in_strings(text, |c| ((c as u32) < 0x20).then(|| format!("\\u{:04x}", c as u32)))
}

/// A JSON text with every `<` and `[` inside its strings escaped (`\u003c`, `\u005b`: the
/// same values), so that no string in it reads as a chat template's special token once the
/// server renders the message (`<|im_end|>`, `[INST]`).
fn json_text(text: &str) -> String {
    escape_in_strings(text, |c| match c {
        '<' => Some("\\u003c".into()),
        '[' => Some("\\u005b".into()),
        _ => None,
    })
}

/// `text` (JSON) with the characters `escape` names replaced inside its strings.
fn escape_in_strings(text: &str, escape: impl Fn(char) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut inside, mut escaped) = (false, false);
    for c in text.chars() {
        match (c, inside.then(|| escape(c)).flatten()) {
            (_, Some(e)) => out.push_str(&e),
            ('"', None) if !escaped => {
                inside = !inside;
                out.push(c);
            }
            (c, None) => out.push(c),
        }
        escaped = inside && c == '\\' && !escaped;
    }
    out
}

/// Reads a reply as one turn: a call (anything after it ignored), an answer's first line, or
/// why it is not a turn. A quoted answer (`r.quotes`) is checked span and all.
pub fn read_turn(r: &Rules<'_>, text: &str) -> Result<Outcome, String> {
    let text = text.trim_start();
    let mut state = Turn::start();
    let answer = || {
        let (_, line) = turn::answer_in(text);
        Outcome::Answer(line.to_string(), format!("{}{line}", turn::ANSWER))
    };
    for (i, b) in text.bytes().enumerate() {
        if matches!(state, Turn::Answer) {
            return Ok(answer());
        }
        if !turn::feed(r, &mut state, b) {
            let why = if state.answering() {
                "the answer stops quoting a tool result"
            } else {
                "the reply stops following the format"
            };
            // Up to the refused byte, which may be the first of a character.
            return Err(format!("{why} at {:?}", String::from_utf8_lossy(&text.as_bytes()[..=i])));
        }
        if let Turn::Call(st) = &state {
            if let Some(call) = r.calls.is_done(st).then(|| r.calls.call(st)).flatten() {
                return Ok(Outcome::Call(call, text[..=i].to_string()));
            }
        }
    }
    if state.may_end() {
        Ok(answer())
    } else if state.answering() {
        Err("the answer quotes nothing".into())
    } else {
        Err("the reply ended before a complete tool call or answer".into())
    }
}

impl Engine for Remote {
    fn begin(&mut self, system: &str, example: Option<&str>, task: &str) -> Result<usize, AgentError> {
        self.counters = Counters::default();
        self.resolve()?;
        self.rebuild(system, example, task, &[])
    }

    fn turn(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError> {
        let form = self.resolve()?;
        for attempt in 0..=RETRIES {
            let before = self.counters.decode_tokens;
            let reply = self.complete(rules, cfg, budget, obs)?;
            let n = (self.counters.decode_tokens - before) as usize;
            let read = match self.turn_text(form, &reply) {
                Err(why) => Err((why, reply.content.clone())),
                Ok(text) => {
                    if !matches!(form, Form::Grammar(_) | Form::None) {
                        obs.text(&text);
                    }
                    // The server read results with word joiners after `<` and `[`; a quote of
                    // them is checked without.
                    let text = if rules.quotes.is_some() { prompt::without_joiners(&text) } else { text };
                    read_turn(rules, &text).map_err(|why| (why, text))
                }
            };
            match read {
                Ok(outcome) => {
                    let kept = match &outcome {
                        Outcome::Call(_, t) | Outcome::Answer(_, t) | Outcome::Budget(t) => t.clone(),
                    };
                    let call = match &outcome {
                        Outcome::Call(c, _) => Some(c.clone()),
                        _ => None,
                    };
                    let m = self.assistant(&kept, call.as_ref());
                    self.messages.push(m);
                    return Ok((outcome, n));
                }
                Err((why, text)) if attempt < RETRIES => {
                    tracing::info!(attempt, why = %why, "a server's reply was refused");
                    self.counters.refused_replies += 1;
                    // Refused replies go back as text, whatever the form: no call id is left
                    // waiting for a result.
                    let mut end = text.len().min(REFUSED_SHOWN);
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    self.messages.push(json!({"role": "assistant", "content": prompt::reply_for_server(&text[..end])}));
                    // The reason quotes the reply: it is sealed like the reply.
                    let how = match form {
                        Form::JsonSchema(_) => "one JSON object as the system message shows".to_string(),
                        Form::Tools => "a function call or the final answer".to_string(),
                        _ => format!("a tool call or `{}` as the system message shows", turn::ANSWER.trim()),
                    };
                    self.messages.push(json!({"role": "user", "content": format!(
                        "That reply was not used: {}. Reply with {how}.",
                        prompt::for_server(&prompt::seal(&why)),
                    )}));
                }
                Err((why, _)) => {
                    self.counters.refused_replies += 1;
                    return Err(AgentError::Model(format!("the server's replies do not follow the protocol: {why}")));
                }
            }
        }
        Err(AgentError::Model("unreachable: retries exhausted".into()))
    }

    // What came from tools and memory reaches the server only as quoted content (see
    // `prompt::for_server`): its chat template and tokenizer are not ours to trust.
    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError> {
        let content = prompt::for_server(block);
        let m = match self.pending.take() {
            Some(id) => json!({"role": "tool", "tool_call_id": id, "content": content}),
            None => json!({"role": "user", "content": content}),
        };
        self.messages.push(m);
        Ok((self.counters.prefill_tokens as usize, 0))
    }

    /// A server's tokenizer is not at hand: about four bytes a token.
    fn context_tokens(&self) -> usize {
        let text = |m: &Value| m["content"].as_str().map_or(0, str::len) + m["tool_calls"].to_string().len();
        self.messages.iter().map(text).sum::<usize>() / 4
    }

    fn count(&self, block: &str) -> Result<usize, AgentError> {
        Ok(block.len() / 4 + 8)
    }

    fn rebuild(
        &mut self,
        system: &str,
        example: Option<&str>,
        task: &str,
        turns: &[(String, String)],
    ) -> Result<usize, AgentError> {
        let note = self.form.and_then(|f| f.system_note()).unwrap_or_default();
        self.pending = None;
        self.messages = vec![json!({"role": "system", "content": format!("{}{note}", prompt::for_server(system))})];
        // The worked example, as the messages it stands for, in the form the server speaks.
        for (role, content) in example.map(prompt::chatml_messages).unwrap_or_default() {
            if role == "assistant" {
                let call = self.call_in(content);
                let m = self.assistant(content, call.as_ref());
                self.messages.push(m);
            } else if role == "user" {
                self.resume(content)?;
            }
        }
        self.messages.push(json!({"role": "user", "content": prompt::for_server(task)}));
        for (turn, block) in turns {
            let call = self.call_in(turn);
            let m = self.assistant(turn, call.as_ref());
            self.messages.push(m);
            self.resume(block)?;
        }
        Ok(self.context_tokens())
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            path: self.url.clone(),
            name: self.model.clone(),
            architecture: "remote".into(),
            vocab: 0,
            context: 0,
            constraints: self.form.map(|f| f.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings lose their `<` and `[` to escapes (the same JSON values); the JSON around them
    /// keeps its arrays; raw control characters in strings become escapes.
    #[test]
    fn json_sent_to_servers_spells_no_special_tokens() {
        let v = json!({"a": ["<|im_end|>", "[INST] x\\\"[y"], "b": 1});
        let text = json_text(&v.to_string());
        assert!(!text.contains("<|") && !text.contains("[INST"), "{text}");
        assert!(text.starts_with("{\"a\":["), "{text}");
        assert_eq!(serde_json::from_str::<Value>(&text).expect("still JSON"), v);
        let raw = "{\"answer\": \"two\nlines\"}";
        let v: Value = serde_json::from_str(&escape_controls(raw)).expect("JSON once escaped");
        assert_eq!(v["answer"], "two\nlines");
    }
}
