//! One assistant turn, as a byte-level automaton over the model's output:
//!
//! ```text
//! turn    := [ "Thought: " free-line "\n" ] ( call | answer )
//! call    := "<tool_call>\n" CALL          (CALL from agentd_policy::grammar)
//! answer  := "Answer: " ( free-text | quote ) ( <end-of-turn token> | "\n" )
//! ```
//!
//! Outside free text, every token the model could pick is checked against the automaton and
//! masked out if no valid turn continues that way. So the model cannot name a tool it was not
//! granted, or pass an argument its manifest does not allow. With `answer = "quote"`, the
//! answer is a `quote`: a non-empty span of a tool result ([`crate::quote`]), and there is no
//! answer at all before some result printed something.

use agentd_policy::grammar::{CallGrammar, CallState};

use crate::quote::{self, Quotes};

/// What a turn is checked against: the calls the manifest grants, and, for quoted answers,
/// the spans an answer may copy.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The calls.
    pub calls: &'a CallGrammar,
    /// `Some` when the answer must be a quote of these.
    pub quotes: Option<&'a Quotes>,
}

impl<'a> Rules<'a> {
    /// Calls as granted, and a free answer.
    pub fn free(calls: &'a CallGrammar) -> Self {
        Self { calls, quotes: None }
    }
}

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
    /// Writing a quoted answer: the span so far ends in the quotes' state `at`.
    Quote {
        /// The span's state in [`Quotes`].
        at: usize,
        /// Continuation bytes still due for the character in hand (a quote starts and ends
        /// on whole characters).
        due: u8,
        /// Whether it holds anything but blanks yet.
        said: bool,
    },
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

    /// Whether the answer is being written (free or quoted).
    pub fn answering(&self) -> bool {
        matches!(self, Turn::Answer | Turn::Quote { .. })
    }

    /// Whether the answer may end here: free text any time, a quote once it says something
    /// and ends on a whole character.
    pub fn may_end(&self) -> bool {
        match self {
            Turn::Answer => true,
            Turn::Quote { due, said, .. } => *said && *due == 0,
            _ => false,
        }
    }
}

/// A finished turn's text up to the end of its answer's line, and the answer in it: what
/// follows the opener (after the thought's line, if any), trimmed. Empty if `text` is not an
/// answer turn.
pub fn answer_in(text: &str) -> (&str, &str) {
    let start = match text.strip_prefix(THOUGHT) {
        Some(_) => text.find('\n').map_or(text.len(), |i| i + 1),
        None => 0,
    };
    let Some(body) = text[start..].strip_prefix(ANSWER) else { return (text, "") };
    let at = text.len() - body.len();
    let end = body.find('\n').map_or(text.len(), |i| at + i);
    (&text[..end], text[at..end].trim())
}

/// Most states of a quote automaton written into a grammar (about 20 KB of results).
const QUOTE_GRAMMAR_STATES: usize = 40_000;

/// The turn automaton and the call grammar as GBNF, for a server that takes a grammar
/// (llama.cpp's `grammar`): rule `root` is a turn. It offers a subset of what [`feed`]
/// accepts: a thought in ASCII (the automaton counts its bytes), a quote that does not start
/// on a blank, and the call grammar's numbers as [`agentd_policy::grammar::gbnf`] says.
/// `None` if no turn can be written.
pub fn gbnf(r: &Rules<'_>) -> Option<String> {
    use agentd_policy::grammar::gbnf::lit;
    let call = r.calls.gbnf("call");
    let free = || Some(format!("answer ::= {} [^\\n]*\n", lit(ANSWER)));
    let (answer, rules) = match r.quotes {
        None => (free(), None),
        // A grammar is sent with every request: past this size, the quote is left to the
        // check of the reply.
        Some(q) if q.states() > QUOTE_GRAMMAR_STATES => (if q.is_empty() { None } else { free() }, None),
        Some(q) => match q.gbnf("quote") {
            Some(rules) => (Some(format!("answer ::= {} quote\n", lit(ANSWER))), Some(rules)),
            None => (None, None),
        },
    };
    let body: Vec<&str> =
        [call.as_ref().map(|_| "call-turn"), answer.as_ref().map(|_| "answer")].into_iter().flatten().collect();
    if body.is_empty() {
        return None;
    }
    let mut g = format!(
        "root ::= ( {} thought{{0,{THOUGHT_BYTES}}} \"\\n\" )? ( {} )\nthought ::= [ -~\\t]\n",
        lit(THOUGHT),
        body.join(" | ")
    );
    if let Some(call) = call {
        g.push_str(&format!("call-turn ::= {} call\n{call}", lit(CALL_OPEN)));
    }
    g.extend(answer);
    g.extend(rules);
    Some(g)
}

/// Feeds one byte; false if no valid turn continues that way.
pub fn feed(r: &Rules<'_>, turn: &mut Turn, b: u8) -> bool {
    match turn {
        Turn::Choose { buf, thought } => {
            buf.push(b);
            // A quoted answer needs something to quote.
            let answer = r.quotes.is_none_or(|q| !q.is_empty());
            let openers: &[&str] = match (*thought, answer) {
                (true, true) => &[THOUGHT, CALL_OPEN, ANSWER],
                (true, false) => &[THOUGHT, CALL_OPEN],
                (false, true) => &[CALL_OPEN, ANSWER],
                (false, false) => &[CALL_OPEN],
            };
            let Some(opener) = openers.iter().find(|o| o.as_bytes().starts_with(buf)) else { return false };
            if buf.len() == opener.len() {
                *turn = match (*opener, r.quotes) {
                    (THOUGHT, _) => Turn::Thought { len: 0 },
                    (CALL_OPEN, _) => Turn::Call(r.calls.start()),
                    (_, None) => Turn::Answer,
                    (_, Some(_)) => Turn::Quote { at: quote::START, due: 0, said: false },
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
        Turn::Call(st) => r.calls.feed(st, b),
        Turn::Answer => true,
        Turn::Quote { at, due, said } => {
            // The line ends the answer; what follows it in the token is cut off.
            if b == b'\n' {
                let ok = turn.may_end();
                *turn = Turn::Answer;
                return ok;
            }
            // Whole characters only: a continuation byte exactly where one is due.
            *due = match (b, *due) {
                (0x80..=0xBF, 0) => return false,
                (0x80..=0xBF, d) => d - 1,
                (_, 1..) => return false,
                (0xC0..=0xDF, _) => 1,
                (0xE0..=0xEF, _) => 2,
                (0xF0..=0xF7, _) => 3,
                (0x00..=0x7F, _) => 0,
                _ => return false,
            };
            *said |= !b.is_ascii_whitespace();
            match r.quotes.and_then(|q| q.step(*at, b)) {
                Some(next) => {
                    *at = next;
                    true
                }
                None => false,
            }
        }
    }
}

/// Feeds a token's bytes; the new state if every byte was accepted.
pub fn feed_all(r: &Rules<'_>, turn: &Turn, bytes: &[u8]) -> Option<Turn> {
    if bytes.is_empty() {
        return None;
    }
    let mut t = turn.clone();
    bytes.iter().all(|b| feed(r, &mut t, *b)).then_some(t)
}

/// Which tokens may come next: `allowed[id]`. `bytes(id)` gives a token's bytes (empty for
/// special tokens); `ends` are the end-of-turn tokens, allowed only while answering.
pub fn mask<'v>(r: &Rules<'_>, turn: &Turn, vocab: usize, bytes: &dyn Fn(u32) -> &'v [u8], ends: &[u32]) -> Vec<bool> {
    let mut allowed = vec![false; vocab];
    // Only tokens whose first byte is acceptable need a full check.
    let first: Vec<bool> = (0u16..256).map(|b| feed_all(r, turn, &[b as u8]).is_some()).collect();
    for (id, slot) in allowed.iter_mut().enumerate() {
        let id = id as u32;
        if ends.contains(&id) {
            *slot = turn.may_end();
            continue;
        }
        let b = bytes(id);
        if b.is_empty() {
            continue;
        }
        // The answer is free text; everything else (a thought too, which must end at its
        // newline and go on with an opener) is checked byte by byte.
        *slot = matches!(turn, Turn::Answer) || (first[b[0] as usize] && feed_all(r, turn, b).is_some());
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
        let r = Rules::free(&g);
        let text = "Thought: say hi\n<tool_call>\n{\"name\": \"echo\", \"arguments\": {\"text\": \"hi\"}}";
        let t = feed_all(&r, &Turn::start(), text.as_bytes()).expect("valid turn");
        assert!(t.call_done(&g));
        assert!(feed_all(&r, &Turn::start(), b"Answer: 42").is_some());
        assert!(feed_all(&r, &Turn::start(), b"Sure! ").is_none(), "prose outside the protocol");
        assert!(feed_all(&r, &Turn::start(), b"Thought: a\nThought: b").is_none(), "one thought per turn");
        let bad = "<tool_call>\n{\"name\": \"rm\"";
        assert!(feed_all(&r, &Turn::start(), bad.as_bytes()).is_none(), "an ungranted tool");
    }

    #[test]
    fn the_answer_is_read_after_the_thought_and_up_to_its_line() {
        assert_eq!(answer_in("Thought: x\nAnswer: kenji\nmore"), ("Thought: x\nAnswer: kenji", "kenji"));
        assert_eq!(answer_in("Answer:  42 "), ("Answer:  42 ", "42"));
        assert_eq!(answer_in("Thought: Answer: no\n<tool_call>"), ("Thought: Answer: no\n<tool_call>", ""));
    }

    #[test]
    fn masks_allow_only_protocol_tokens() {
        let g = grammar();
        let r = Rules::free(&g);
        let vocab: Vec<&[u8]> = vec![b"", b"<", b"tool", b"Answer", b"hello", b"\n", b"Th"];
        let bytes = |id: u32| vocab[id as usize];
        let m = mask(&r, &Turn::start(), vocab.len(), &bytes, &[0]);
        assert_eq!(m, vec![false, true, false, true, false, false, true]);
        let m = mask(&r, &Turn::Answer, vocab.len(), &bytes, &[0]);
        assert!(m.iter().all(|a| *a), "answers are free, and may end");
    }

    /// The grammar a server gets reads turns as the automaton does.
    #[test]
    fn the_gbnf_of_a_turn_is_the_automaton() {
        let g = grammar();
        let m = |r: &Rules<'_>, t: &str| agentd_policy::grammar::gbnf::matches(&gbnf(r).expect("a turn"), "root", t);
        let free = Rules::free(&g);
        let q = Quotes::new(["kenji is on call"]);
        let quoted = Rules { calls: &g, quotes: Some(&q) };
        let call = "<tool_call>\n{\"name\": \"echo\", \"arguments\": {\"text\": \"hi\"}}";
        for (r, text, want) in [
            (&free, call, true),
            (&free, &format!("Thought: say hi\n{call}") as &str, true),
            (&free, "Answer: anything at all", true),
            (&free, "Thought: a\nThought: b\nAnswer: x", false),
            (&free, "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}", false),
            (&free, "Sure! Answer: x", false),
            (&quoted, "Answer: kenji", true),
            (&quoted, "Answer: Kenji", false),
            (&quoted, "Answer: kenji is on call, surely", false),
            (&quoted, call, true),
        ] {
            assert_eq!(m(r, text), Ok(want), "{text}");
            let state = feed_all(r, &Turn::start(), text.as_bytes());
            let done = state.is_some_and(|t| t.may_end() || t.call_done(&g));
            assert_eq!(done, want, "the automaton on {text}");
        }
        let none = Quotes::new([""]);
        let r = Rules { calls: &g, quotes: Some(&none) };
        assert_eq!(agentd_policy::grammar::gbnf::matches(&gbnf(&r).expect("calls"), "root", "Answer: x"), Ok(false));
    }

    /// A quoted answer is a span of a result, one line long; with nothing to quote there is
    /// no answer at all, only calls.
    #[test]
    fn a_quoted_answer_is_a_span_of_a_result() {
        let g = grammar();
        let q = Quotes::new(["services.csv:3:billing-worker,payments,1,kenji"]);
        let r = Rules { calls: &g, quotes: Some(&q) };
        let t = feed_all(&r, &Turn::start(), b"Thought: look it up\nAnswer: 1,kenji").expect("a span");
        assert!(t.may_end());
        assert!(feed_all(&r, &Turn::start(), b"Answer: kenji\n").is_some(), "a newline ends it");
        assert!(feed_all(&r, &Turn::start(), b"Answer: Kenji").is_none(), "not in the result");
        assert!(feed_all(&r, &Turn::start(), b"Answer: kenji is on call").is_none(), "past the span");
        assert!(feed_all(&r, &Turn::start(), b"Answer: \n").is_none(), "an empty quote");
        let open = feed_all(&r, &Turn::start(), b"Answer: ").expect("opens");
        assert!(!open.may_end(), "an empty quote may not end");
        let vocab: Vec<&[u8]> = vec![b"", b"ken", b"kenji", b"Payment", b"1,", b"\n"];
        let m = mask(&r, &open, vocab.len(), &|id| vocab[id as usize], &[0]);
        assert_eq!(m, vec![false, true, true, false, true, false]);
        // Blanks say nothing, and a quote starts and ends on whole characters.
        let q2 = Quotes::new(["a  café, au lait"]);
        let r2 = Rules { calls: &g, quotes: Some(&q2) };
        assert!(!feed_all(&r2, &Turn::start(), b"Answer:  ").expect("blanks are in the line").may_end());
        assert!(feed_all(&r2, &Turn::start(), "Answer: café".as_bytes()).expect("a span").may_end());
        let half = feed_all(&r2, &Turn::start(), &"Answer: café".as_bytes()[..12]).expect("a span so far");
        assert!(!half.may_end(), "inside a character");
        assert!(feed_all(&r2, &Turn::start(), &[b"Answer: ".as_slice(), &"é".as_bytes()[1..]].concat()).is_none());
        let none = Quotes::new([""]);
        let r = Rules { calls: &g, quotes: Some(&none) };
        assert!(feed_all(&r, &Turn::start(), b"Answer").is_none(), "nothing to quote yet");
        assert!(feed_all(&r, &Turn::start(), b"<tool_call>\n").is_some());
    }
}
