//! One assistant turn, as a byte-level automaton over the model's output:
//!
//! ```text
//! turn    := [ "Thought: " free-line "\n" ] ( call | answer )
//! call    := "<tool_call>\n" CALL          (CALL from agentd_policy::grammar)
//! answer  := "Answer: " free-text ( <end-of-turn token> | "\n" )
//! ```
//!
//! Outside free text, every token the model could pick is checked against the automaton and
//! masked out if no valid turn continues that way. So the model cannot name a tool it was not
//! granted, or pass an argument its manifest does not allow.

use agentd_policy::grammar::{CallGrammar, CallState};

/// Opens a tool call.
pub const CALL_OPEN: &str = "<tool_call>\n";
/// What agentd appends after a finished call.
pub const CALL_CLOSE: &str = "\n</tool_call>";
/// Opens the final answer.
pub const ANSWER: &str = "Answer: ";
/// Opens a line of thought.
pub const THOUGHT: &str = "Thought: ";

/// Longest thought, in bytes, before it must end.
const THOUGHT_BYTES: usize = 400;

/// Where a turn is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turn {
    /// Choosing among the openers (`thought` false once a thought was had).
    Choose {
        /// Bytes of the opener so far.
        buf: Vec<u8>,
        /// Whether a thought may still come.
        thought: bool,
    },
    /// Thinking, up to a newline.
    Thought {
        /// Bytes so far.
        len: usize,
    },
    /// Writing a call.
    Call(CallState),
    /// Writing the answer, up to an end-of-turn token.
    Answer,
}

impl Turn {
    /// A new turn.
    pub fn start() -> Self {
        Turn::Choose { buf: Vec::new(), thought: true }
    }

    /// Whether a tool call is complete.
    #[cfg(test)]
    pub fn call_done(&self, g: &CallGrammar) -> bool {
        matches!(self, Turn::Call(st) if g.is_done(st))
    }
}

/// Feeds one byte; false if no valid turn continues that way.
pub fn feed(g: &CallGrammar, turn: &mut Turn, b: u8) -> bool {
    match turn {
        Turn::Choose { buf, thought } => {
            buf.push(b);
            let openers: &[&str] = if *thought { &[THOUGHT, CALL_OPEN, ANSWER] } else { &[CALL_OPEN, ANSWER] };
            let Some(opener) = openers.iter().find(|o| o.as_bytes().starts_with(buf)) else { return false };
            if buf.len() == opener.len() {
                *turn = match *opener {
                    THOUGHT => Turn::Thought { len: 0 },
                    CALL_OPEN => Turn::Call(g.start()),
                    _ => Turn::Answer,
                };
            }
            true
        }
        Turn::Thought { len } => {
            if b == b'\n' {
                *turn = Turn::Choose { buf: Vec::new(), thought: false };
                return true;
            }
            *len += 1;
            *len <= THOUGHT_BYTES
        }
        Turn::Call(st) => g.feed(st, b),
        Turn::Answer => true,
    }
}

/// Feeds a token's bytes; the new state if every byte was accepted.
pub fn feed_all(g: &CallGrammar, turn: &Turn, bytes: &[u8]) -> Option<Turn> {
    if bytes.is_empty() {
        return None;
    }
    let mut t = turn.clone();
    bytes.iter().all(|b| feed(g, &mut t, *b)).then_some(t)
}

/// Which tokens may come next: `allowed[id]`. `bytes(id)` gives a token's bytes (empty for
/// special tokens); `ends` are the end-of-turn tokens, allowed only while answering.
pub fn mask<'v>(
    g: &CallGrammar,
    turn: &Turn,
    vocab: usize,
    bytes: &dyn Fn(u32) -> &'v [u8],
    ends: &[u32],
) -> Vec<bool> {
    let mut allowed = vec![false; vocab];
    // Only tokens whose first byte is acceptable need a full check.
    let first: Vec<bool> = (0u16..256).map(|b| feed_all(g, turn, &[b as u8]).is_some()).collect();
    for (id, slot) in allowed.iter_mut().enumerate() {
        let id = id as u32;
        if ends.contains(&id) {
            *slot = matches!(turn, Turn::Answer);
            continue;
        }
        let b = bytes(id);
        if b.is_empty() {
            continue;
        }
        // The answer is free text; everything else (a thought too, which must end at its
        // newline and go on with an opener) is checked byte by byte.
        *slot = matches!(turn, Turn::Answer) || (first[b[0] as usize] && feed_all(g, turn, b).is_some());
    }
    allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grammar() -> CallGrammar {
        let m = agentd_policy::parse(
            "t.toml",
            "version = 1\n[agent]\nname = \"t\"\n[tools.echo]\nargv = [\"/bin/echo\", \"{text}\"]\n",
        )
        .expect("manifest");
        CallGrammar::new(&m)
    }

    #[test]
    fn a_turn_is_a_thought_then_a_call_or_an_answer() {
        let g = grammar();
        let text = "Thought: say hi\n<tool_call>\n{\"name\": \"echo\", \"arguments\": {\"text\": \"hi\"}}";
        let t = feed_all(&g, &Turn::start(), text.as_bytes()).expect("valid turn");
        assert!(t.call_done(&g));
        assert!(feed_all(&g, &Turn::start(), b"Answer: 42").is_some());
        assert!(feed_all(&g, &Turn::start(), b"Sure! ").is_none(), "prose outside the protocol");
        assert!(feed_all(&g, &Turn::start(), b"Thought: a\nThought: b").is_none(), "one thought per turn");
        let bad = "<tool_call>\n{\"name\": \"rm\"";
        assert!(feed_all(&g, &Turn::start(), bad.as_bytes()).is_none(), "an ungranted tool");
    }

    #[test]
    fn masks_allow_only_protocol_tokens() {
        let g = grammar();
        let vocab: Vec<&[u8]> = vec![b"", b"<", b"tool", b"Answer", b"hello", b"\n", b"Th"];
        let bytes = |id: u32| vocab[id as usize];
        let m = mask(&g, &Turn::start(), vocab.len(), &bytes, &[0]);
        assert_eq!(m, vec![false, true, false, true, false, false, true]);
        let m = mask(&g, &Turn::Answer, vocab.len(), &bytes, &[0]);
        assert!(m.iter().all(|a| *a), "answers are free, and may end");
    }
}
