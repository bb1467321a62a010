//! `--backend openai`: the same loop, protocol and sandbox, with a model behind an
//! OpenAI-compatible chat completions endpoint (llama.cpp's server, vLLM, Ollama).
//!
//! A server's tokens cannot be masked from here, so each reply is checked against the same
//! turn automaton and call grammar instead: a reply that does not follow them never runs,
//! and the model is told what was wrong and asked again (twice at most).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

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
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).field("model", &self.model).finish_non_exhaustive()
    }
}

impl Remote {
    /// `endpoint` is the API base (`http://127.0.0.1:8080/v1`); the key comes from
    /// `$OPENAI_API_KEY` if set.
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
        }
    }

    fn complete(&mut self, cfg: &RunConfig, max_tokens: usize) -> Result<String, AgentError> {
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
        let started = Instant::now();
        let mut req = self.agent.post(&self.url);
        if let Some(k) = &self.key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let err = |e: ureq::Error| AgentError::Model(format!("{}: {e}", self.url));
        let mut resp = req.send_json(&body).map_err(err)?;
        let status = resp.status();
        let v: Value = resp.body_mut().read_json().map_err(err)?;
        if !status.is_success() {
            return Err(AgentError::Model(format!("{} answered {status}: {v}", self.url)));
        }
        let c = &mut self.counters;
        c.prefill_tokens += v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        c.prefills += 1;
        c.decode_tokens += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
        c.decode_time += started.elapsed();
        Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
    }
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
        self.rebuild(system, example, task, &[])
    }

    fn turn(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError> {
        for attempt in 0..=RETRIES {
            let before = self.counters.decode_tokens;
            let text = self.complete(cfg, budget)?;
            let n = (self.counters.decode_tokens - before) as usize;
            obs.text(&text);
            // The server read results with word joiners after `<` and `[`; a quote of them
            // is checked without.
            let text = if rules.quotes.is_some() { prompt::without_joiners(&text) } else { text };
            match read_turn(rules, &text) {
                Ok(outcome) => {
                    let kept = match &outcome {
                        Outcome::Call(_, t) | Outcome::Answer(_, t) | Outcome::Budget(t) => t.clone(),
                    };
                    self.messages.push(json!({"role": "assistant", "content": prompt::reply_for_server(&kept)}));
                    return Ok((outcome, n));
                }
                Err(why) if attempt < RETRIES => {
                    self.messages.push(json!({"role": "assistant", "content": prompt::reply_for_server(&text)}));
                    // The reason quotes the reply: it is sealed like the reply.
                    self.messages.push(json!({"role": "user", "content": format!(
                        "That reply was not used: {}. Reply with a tool call or `{}` as the system message shows.",
                        prompt::for_server(&prompt::seal(&why)),
                        turn::ANSWER.trim()
                    )}));
                }
                Err(why) => {
                    return Err(AgentError::Model(format!("the server's replies do not follow the protocol: {why}")))
                }
            }
        }
        Err(AgentError::Model("unreachable: retries exhausted".into()))
    }

    // What came from tools and memory reaches the server only as quoted content (see
    // `prompt::for_server`): its chat template and tokenizer are not ours to trust.
    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError> {
        self.messages.push(json!({"role": "user", "content": prompt::for_server(block)}));
        Ok((self.counters.prefill_tokens as usize, 0))
    }

    /// A server's tokenizer is not at hand: about four bytes a token.
    fn context_tokens(&self) -> usize {
        self.messages.iter().map(|m| m["content"].as_str().map_or(0, str::len)).sum::<usize>() / 4
    }

    fn count(&self, block: &str) -> Result<usize, AgentError> {
        Ok(block.len() / 4 + 8)
    }

    fn rebuild(
        &mut self,
        system: &str,
        _example: Option<&str>,
        task: &str,
        turns: &[(String, String)],
    ) -> Result<usize, AgentError> {
        self.messages = vec![
            json!({"role": "system", "content": prompt::for_server(system)}),
            json!({"role": "user", "content": prompt::for_server(task)}),
        ];
        for (turn, block) in turns {
            self.messages.push(json!({"role": "assistant", "content": prompt::reply_for_server(turn)}));
            self.messages.push(json!({"role": "user", "content": prompt::for_server(block)}));
        }
        Ok(0)
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
        }
    }
}
