//! Semantic slicing: text is cut into sentences, sentences into segments where the topic
//! changes (adjacent sentences' embeddings stop resembling each other), and each segment is
//! compressed to its information-dense sentences. Filler ("ok, let me check") goes; numbers,
//! names, identifiers, decisions and tool results stay.

/// Longest segment, in sentences.
pub const MAX_SENTENCES: usize = 12;

/// A topic segment and its compressed form.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Index of its first sentence in the text.
    pub first: usize,
    /// The whole segment.
    pub text: String,
    /// Its dense sentences, in order.
    pub compressed: String,
}

impl Segment {
    /// Compressed bytes over original bytes (1.0 keeps everything).
    pub fn ratio(&self) -> f32 {
        self.compressed.len() as f32 / self.text.len().max(1) as f32
    }
}

/// Splits `text` into sentences: at `.`, `!` or `?` before whitespace, and at line ends (notes
/// and logs put one fact per line). Empty pieces are dropped.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut start = 0;
        let bytes = line.as_bytes();
        for (i, b) in bytes.iter().enumerate() {
            let end = matches!(b, b'.' | b'!' | b'?') && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace());
            if end && !(*b == b'.' && abbreviation(&line[start..i])) {
                out.push(line[start..=i].trim().to_string());
                start = i + 1;
            }
        }
        out.push(line[start..].trim().to_string());
    }
    out.retain(|s| !s.is_empty());
    // A line without stops (JSON, a long log line) would be one vector for all of it, and the
    // embedder reads only its first 256 tokens: such text is cut at spaces.
    out.into_iter().flat_map(|s| pieces(&s)).collect()
}

/// Longest sentence, in bytes.
const MAX_SENTENCE: usize = 400;

fn pieces(s: &str) -> Vec<String> {
    if s.len() <= MAX_SENTENCE {
        return vec![s.to_string()];
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in s.split(' ') {
        if !cur.is_empty() && cur.len() + 1 + word.len() > MAX_SENTENCE {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
        // A single word longer than the limit is cut at character boundaries.
        while cur.len() > MAX_SENTENCE {
            let mut at = MAX_SENTENCE;
            while !cur.is_char_boundary(at) {
                at -= 1;
            }
            out.push(cur[..at].to_string());
            cur = cur[at..].to_string();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// Whether the text before a `.` ends in an abbreviation or an initial ("Dr.", "e.g.",
/// "J."), which does not end a sentence.
fn abbreviation(before: &str) -> bool {
    const SHORT: [&str; 14] =
        ["dr", "mr", "mrs", "ms", "prof", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "no", "fig"];
    let word = before.rsplit(char::is_whitespace).next().unwrap_or_default();
    let lower = word.to_lowercase();
    SHORT.contains(&lower.as_str()) || (word.len() == 1 && word.chars().all(|c| c.is_ascii_uppercase()))
}

/// Words that mark a decision, a cause or a commitment.
const DECISIONS: [&str; 16] = [
    "decided", "agreed", "approved", "rejected", "because", "cause", "must", "will", "deadline", "owner", "failed",
    "fixed", "rolled", "deployed", "error", "result",
];

/// Capitalised words that start sentences rather than name things.
const STARTERS: [&str; 20] = [
    "the", "a", "an", "it", "i", "we", "you", "they", "this", "that", "then", "our", "ok", "okay", "so", "and", "but",
    "let", "sounds", "thanks",
];

/// The share of a sentence's words that carry facts: numbers, names, identifiers (paths,
/// keys, addresses, hyphenated names) and decision words.
pub fn density(sentence: &str) -> f32 {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    let facts = words
        .iter()
        .filter(|w| {
            let bare = w.trim_matches(|c: char| !c.is_alphanumeric());
            let lower = bare.to_lowercase();
            w.chars().any(|c| c.is_ascii_digit())
                || (bare.chars().next().is_some_and(char::is_uppercase) && !STARTERS.contains(&lower.as_str()))
                || w.contains(['/', '@', '_', '=', ':'])
                || bare.trim_matches('-').contains('-')
                || DECISIONS.iter().any(|d| lower.starts_with(d))
        })
        .count();
    facts as f32 / words.len().max(1) as f32
}

/// Where segments start: at 0, wherever adjacent sentences are much less alike than is usual
/// in this text (below the mean similarity by a standard deviation, or below 0.2), and at
/// least every [`MAX_SENTENCES`]. `vectors` are the sentences' unit embeddings.
pub fn boundaries(vectors: &[Vec<f32>]) -> Vec<usize> {
    if vectors.is_empty() {
        return Vec::new();
    }
    let sims: Vec<f32> = vectors.windows(2).map(|w| crate::embed::cosine(&w[0], &w[1])).collect();
    let n = sims.len().max(1) as f32;
    let mean = sims.iter().sum::<f32>() / n;
    let sd = (sims.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / n).sqrt();
    let cut = (mean - sd).max(0.2).min(mean);
    let mut starts = vec![0];
    for (i, s) in sims.iter().enumerate() {
        let last = starts.last().copied().unwrap_or(0);
        if *s < cut || i + 1 - last >= MAX_SENTENCES {
            starts.push(i + 1);
        }
    }
    starts
}

/// The segment's dense sentences: every sentence with any fact in it, and of those, when
/// there are more than three, the ones at or above the median density. Never empty.
pub fn compress(sentences: &[String]) -> String {
    let scored: Vec<(usize, f32)> =
        sentences.iter().map(|s| density(s)).enumerate().filter(|(_, d)| *d > 0.0).collect();
    let keep: Vec<usize> = if scored.len() > 3 {
        let mut d: Vec<f32> = scored.iter().map(|(_, d)| *d).collect();
        d.sort_by(f32::total_cmp);
        let median = d[d.len() / 2];
        scored.iter().filter(|(_, s)| *s >= median).map(|(i, _)| *i).collect()
    } else {
        scored.iter().map(|(i, _)| *i).collect()
    };
    if keep.is_empty() {
        // All filler: keep the longest sentence, so a segment never vanishes.
        let longest = sentences.iter().max_by_key(|s| s.len()).cloned().unwrap_or_default();
        return longest;
    }
    keep.iter().map(|i| sentences[*i].as_str()).collect::<Vec<_>>().join(" ")
}

/// Slices `sentences` (with their embeddings) into compressed segments.
pub fn segments(sentences: &[String], vectors: &[Vec<f32>]) -> Vec<Segment> {
    let mut starts = boundaries(vectors);
    starts.push(sentences.len());
    starts
        .windows(2)
        .filter(|w| w[0] < w[1])
        .map(|w| {
            let part = &sentences[w[0]..w[1]];
            Segment { first: w[0], text: part.join(" "), compressed: compress(part) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_stops_and_lines() {
        let s = sentences("Deploy v2.3 at 10:00. Then check it!\nok\n\n- 2026-10-02 api: p99 840 ms");
        assert_eq!(s, ["Deploy v2.3 at 10:00.", "Then check it!", "ok", "- 2026-10-02 api: p99 840 ms"]);
        let s = sentences("Dr. Achebe met J. Smith, e.g. at noon. Done.");
        assert_eq!(s, ["Dr. Achebe met J. Smith, e.g. at noon.", "Done."]);
        let json =
            format!("{{\"items\": [{}]}}", (0..200).map(|i| format!("\"item-{i}\"")).collect::<Vec<_>>().join(", "));
        let parts = sentences(&json);
        assert!(parts.len() > 3 && parts.iter().all(|p| p.len() <= MAX_SENTENCE), "{parts:?}");
        assert_eq!(parts.join(" "), json, "cut at spaces, nothing lost");
        assert!(sentences(&"x".repeat(1000)).iter().all(|p| p.len() <= MAX_SENTENCE));
    }

    #[test]
    fn facts_are_dense_and_filler_is_not() {
        assert!(density("Kenji owns billing-worker since 2026-10-19.") > 0.5);
        assert!(density("We decided to roll back the TLS upgrade.") > 0.0);
        assert_eq!(density("ok sounds good to me"), 0.0);
    }

    #[test]
    fn compression_keeps_the_facts_and_drops_filler() {
        let s = sentences(
            "ok.\nLet me look.\nThe queue held 12,400 jobs.\nsounds good.\nRoot cause: a stuck lock in retry.py.",
        );
        let c = compress(&s);
        assert!(c.contains("12,400") && c.contains("retry.py"), "{c}");
        assert!(!c.contains("sounds good") && !c.contains("Let me look"), "{c}");
        let seg = Segment { first: 0, text: s.join(" "), compressed: c };
        assert!(seg.ratio() < 0.8, "{}", seg.ratio());
        assert_eq!(compress(&sentences("ok. fine.")), "fine.", "all filler still leaves something");
    }

    #[test]
    fn topics_change_where_neighbours_stop_resembling_each_other() {
        // Two topics of three sentences: near-identical vectors within, orthogonal across.
        let a = vec![1.0, 0.0, 0.0];
        let b = vec![0.0, 1.0, 0.0];
        let vs = vec![a.clone(), a.clone(), a, b.clone(), b.clone(), b];
        assert_eq!(boundaries(&vs), [0, 3]);
        let many = vec![vec![1.0, 0.0]; 30];
        assert_eq!(boundaries(&many), [0, 12, 24], "long runs are cut");
        let text: Vec<String> = (0..6).map(|i| format!("Sentence {i}.")).collect();
        let segs = segments(&text, &vs);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[1].first, 3);
    }
}
