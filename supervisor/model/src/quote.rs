//! Quoted answers: with `answer = "quote"` in the manifest, the final answer must be a span
//! copied byte for byte from what this run's tools printed. Small models reach for the right
//! line of a result and then wander off it, or fall into a loop; held to a span of a result,
//! they copy it (for the demo, `billing-worker: kenji is on call; ...`). It is also a promise to the
//! reader: every byte of the answer came from a recorded tool result, none was made up.
//!
//! The spans are checked, as the model writes, on a suffix automaton of the results: one
//! state per set of spans that end in the same places, a transition per byte, so whether a
//! token continues a span is a walk of its bytes (no search over the results), and the
//! automaton has at most twice as many states as the results have bytes. A span never holds
//! a newline (the answer is one line), so results are joined by newlines and no span reaches
//! across two of them.

/// The spans an answer may quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotes {
    states: Vec<State>,
    /// Bytes of results it was built from.
    bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    /// Length of the longest span that ends in this state.
    len: usize,
    /// The state of that span's longest suffix that ends elsewhere too (the root has none).
    link: Option<usize>,
    /// Transitions, sorted by byte (a handful per state, up to a few dozen at the start).
    next: Vec<(u8, usize)>,
}

/// The empty span: where every answer starts.
pub const START: usize = 0;

impl Quotes {
    /// The automaton of every span of `sources` that holds no newline.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a str>) -> Self {
        let mut q = Self { states: vec![State { len: 0, link: None, next: Vec::new() }], bytes: 0 };
        for source in sources {
            for line in source.split('\n') {
                // Each line is added on its own: after a line, spans start afresh.
                let mut last = START;
                for &b in line.as_bytes() {
                    last = q.extend(last, b);
                }
                q.bytes += line.len();
            }
        }
        q
    }

    /// States of the automaton (at most twice the bytes quoted, plus one).
    pub fn states(&self) -> usize {
        self.states.len()
    }

    /// Whether no span can be quoted (no result printed anything).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The state after `b` from state `at`, if a span continues that way.
    pub fn step(&self, at: usize, b: u8) -> Option<usize> {
        let next = &self.states.get(at)?.next;
        next.binary_search_by_key(&b, |(c, _)| *c).ok().map(|i| next[i].1)
    }

    fn add(&mut self, len: usize, link: Option<usize>, next: Vec<(u8, usize)>) -> usize {
        self.states.push(State { len, link, next });
        self.states.len() - 1
    }

    fn set(&mut self, from: usize, b: u8, to: usize) {
        let next = &mut self.states[from].next;
        match next.binary_search_by_key(&b, |(c, _)| *c) {
            Ok(i) => next[i].1 = to,
            Err(i) => next.insert(i, (b, to)),
        }
    }

    /// The standard online construction, generalized to several strings: appends `b` after
    /// the span that ends in `last`; returns the state of the longer span.
    fn extend(&mut self, last: usize, b: u8) -> usize {
        // The span already exists (a line repeats an earlier one's start): reuse its state,
        // split if it also holds longer spans.
        if let Some(q) = self.step(last, b) {
            let len = self.states[last].len + 1;
            if self.states[q].len == len {
                return q;
            }
            return self.split(last, b, q);
        }
        let cur = self.add(self.states[last].len + 1, None, Vec::new());
        let mut p = Some(last);
        while let Some(at) = p {
            if self.step(at, b).is_some() {
                break;
            }
            self.set(at, b, cur);
            p = self.states[at].link;
        }
        let link = match p {
            None => START,
            Some(at) => {
                let q = self.step(at, b).unwrap_or(START);
                if self.states[at].len + 1 == self.states[q].len {
                    q
                } else {
                    self.split(at, b, q)
                }
            }
        };
        self.states[cur].link = Some(link);
        cur
    }

    /// Splits state `q`, reached from `p` by `b`, so that the span of `p` plus `b` gets a
    /// state of its own; returns it.
    fn split(&mut self, p: usize, b: u8, q: usize) -> usize {
        let next = self.states[q].next.clone();
        let clone = self.add(self.states[p].len + 1, self.states[q].link, next);
        let mut at = Some(p);
        while let Some(a) = at {
            if self.step(a, b) != Some(q) {
                break;
            }
            self.set(a, b, clone);
            at = self.states[a].link;
        }
        self.states[q].link = Some(clone);
        clone
    }

    /// GBNF rules whose rule `root` is a quote (for a server's `grammar`): a span of one
    /// line, starting on a character that is not blank, on whole characters. The automaton
    /// also allows leading blanks; the grammar does not offer them. `None` if there is
    /// nothing to quote. Rules `root-sN` follow its states, on characters: llama.cpp's
    /// grammars read characters, not bytes.
    pub fn gbnf(&self, root: &str) -> Option<String> {
        let mut rules = String::new();
        let mut seen = vec![false; self.states.len()];
        let mut todo = vec![START];
        seen[START] = true;
        while let Some(s) = todo.pop() {
            let chars = self.chars_from(s);
            let alts: Vec<String> = chars
                .iter()
                .filter(|(c, _)| s != START || !c.is_ascii_whitespace())
                .map(|(c, t)| {
                    let c = agentd_policy::grammar::gbnf::lit(&c.to_string());
                    if self.states[*t].next.is_empty() {
                        c
                    } else {
                        format!("{c} {root}-s{t}")
                    }
                })
                .collect();
            for (_, t) in &chars {
                if !seen[*t] && !self.states[*t].next.is_empty() {
                    seen[*t] = true;
                    todo.push(*t);
                }
            }
            if s == START {
                if alts.is_empty() {
                    return None;
                }
                rules.insert_str(0, &format!("{root} ::= {}\n", alts.join(" | ")));
            } else if !alts.is_empty() {
                rules.push_str(&format!("{root}-s{s} ::= ( {} )?\n", alts.join(" | ")));
            }
        }
        Some(rules)
    }

    /// The whole characters a span can go on with from state `at`, and the state after each.
    fn chars_from(&self, at: usize) -> Vec<(char, usize)> {
        let mut out = Vec::new();
        for &(b, t) in &self.states[at].next {
            let more = match b {
                0x00..=0x7F => 0,
                0xC0..=0xDF => 1,
                0xE0..=0xEF => 2,
                0xF0..=0xF7 => 3,
                _ => continue,
            };
            // Walk every continuation the automaton has for this lead byte.
            let mut paths = vec![(vec![b], t)];
            for _ in 0..more {
                paths = paths
                    .into_iter()
                    .flat_map(|(bytes, s)| {
                        self.states[s]
                            .next
                            .iter()
                            .filter(|(c, _)| (0x80..=0xBF).contains(c))
                            .map(move |&(c, n)| ([bytes.as_slice(), &[c]].concat(), n))
                            .collect::<Vec<_>>()
                    })
                    .collect();
            }
            for (bytes, s) in paths {
                if let Some(c) = std::str::from_utf8(&bytes).ok().and_then(|t| t.chars().next()) {
                    out.push((c, s));
                }
            }
        }
        out
    }

    /// Whether `span` can be quoted whole.
    pub fn holds(&self, span: &[u8]) -> bool {
        span.iter().try_fold(START, |at, b| self.step(at, *b)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every span of the sources within a line is accepted, and nothing else, checked against
    /// a plain substring search over many spans of tricky texts (repeats, shared starts).
    #[test]
    fn exactly_the_spans_of_each_line_are_accepted() {
        let sources = ["abcbcabcab\nxyz", "billing-worker,payments,1,kenji", "aaaa", "abab abba"];
        let q = Quotes::new(sources);
        let lines: Vec<&str> = sources.iter().flat_map(|s| s.split('\n')).collect();
        let alphabet = b"abcxyz ,-1kenji\n";
        // All strings up to length 4 over the alphabet, and every substring of the lines.
        let mut cands: Vec<Vec<u8>> = vec![Vec::new()];
        for _ in 0..4 {
            let more: Vec<Vec<u8>> =
                cands.iter().flat_map(|c| alphabet.iter().map(move |b| [c.as_slice(), &[*b]].concat())).collect();
            cands.extend(more);
            cands.sort();
            cands.dedup();
        }
        for l in &lines {
            for i in 0..l.len() {
                for j in i..=l.len() {
                    cands.push(l.as_bytes()[i..j].to_vec());
                }
            }
        }
        cands.push(b"kenji,".to_vec());
        cands.push(b"xyzabc".to_vec());
        for c in cands {
            let want =
                lines.iter().any(|l| l.as_bytes().windows(c.len().max(1)).any(|w| w == c.as_slice())) || c.is_empty();
            assert_eq!(q.holds(&c), want, "{:?}", String::from_utf8_lossy(&c));
        }
        assert!(!q.is_empty());
        assert!(Quotes::new(["", "\n"]).is_empty());
    }

    /// The grammar a server gets quotes what the automaton does, on whole characters, and
    /// does not start on a blank.
    #[test]
    fn the_gbnf_of_quotes_is_the_automaton() {
        let sources = ["billing-worker: kenji is on call; tier 1.", "abab café", "x"];
        let q = Quotes::new(sources);
        let rules = q.gbnf("q").expect("something to quote");
        let m = |t: &str| agentd_policy::grammar::gbnf::matches(&rules, "q", t);
        for ok in ["kenji is on call", "k", "x", "café", "é", "bab c", "billing-worker: kenji is on call; tier 1."] {
            assert_eq!(m(ok), Ok(true), "{ok}");
        }
        for bad in ["", " kenji", "Kenji", "kenji\n", "abab cafe", "xx", "caf\u{e9}s"] {
            assert_eq!(m(bad), Ok(false), "{bad}");
        }
        assert_eq!(Quotes::new([" \n"]).gbnf("q"), None);
        assert_eq!(Quotes::new([""]).gbnf("q"), None);
    }

    /// The automaton stays linear in the results' size.
    #[test]
    fn states_stay_within_twice_the_bytes() {
        let text: String = (0..5000).map(|i| char::from(b'a' + (i * 7 % 13) as u8)).collect();
        let q = Quotes::new([text.as_str(), text.as_str()]);
        assert!(q.states.len() <= 2 * q.bytes + 1, "{} states for {} bytes", q.states.len(), q.bytes);
        assert!(q.holds(&text.as_bytes()[1000..1400]));
    }
}
