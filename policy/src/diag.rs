//! Diagnostics: problems found in a manifest, each tied to a position in its source; and
//! how any error is shown to a user, with its causes.

use std::fmt;
use std::ops::Range;

/// One problem in a manifest, printed as `FILE:LINE:COL: error: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file name as the user gave it.
    pub file: String,
    /// 1-based line of the offending key or value.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value.
    pub col: usize,
    /// Dotted path of the offending key, e.g. `tools.shell.limits.pids`; empty for syntax errors.
    pub key: String,
    /// What is wrong, and where possible what to write instead.
    pub message: String,
    /// An error refuses the manifest; a warning does not.
    pub severity: Severity,
}

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// The manifest is refused.
    Error,
    /// Valid, but probably not what the author meant.
    Warning,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}:{}:{}: {level}: {}", self.file, self.line, self.col, self.message)
    }
}

/// All problems found in one manifest, in source order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.0))]
pub struct Diagnostics(pub Vec<Diagnostic>);

fn render(diags: &[Diagnostic]) -> String {
    diags.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

/// An error and its sources, joined with ": ": how agentd shows an error on one line (in
/// messages, results and audit records).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Collects diagnostics for one source text, translating byte spans into lines and columns.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    file: &'a str,
    src: &'a str,
    pub(crate) diags: Vec<Diagnostic>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(file: &'a str, src: &'a str) -> Self {
        Self { file, src, diags: Vec::new() }
    }

    pub(crate) fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.push(span, key, message.into(), Severity::Error);
    }

    pub(crate) fn warning(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.push(span, key, message.into(), Severity::Warning);
    }

    fn push(&mut self, span: Range<usize>, key: &str, message: String, severity: Severity) {
        let (line, col) = line_col(self.src, span.start);
        self.diags.push(Diagnostic { file: self.file.to_string(), line, col, key: key.to_string(), message, severity });
    }

    /// The warnings if there is no error; else the errors alone.
    pub(crate) fn finish(mut self) -> Result<Vec<Diagnostic>, Diagnostics> {
        self.diags.sort_by_key(|d| (d.line, d.col));
        self.diags.dedup();
        let (errors, warnings): (Vec<_>, Vec<_>) = self.diags.into_iter().partition(|d| d.severity == Severity::Error);
        if errors.is_empty() {
            Ok(warnings)
        } else {
            Err(Diagnostics(errors))
        }
    }
}

/// 1-based line and character column of byte offset `at` in `src`.
fn line_col(src: &str, at: usize) -> (usize, usize) {
    let at = floor_char_boundary(src, at.min(src.len()));
    let before = &src[..at];
    let line = before.bytes().filter(|b| *b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut at: usize) -> usize {
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The candidate closest to `got`, if it is close enough to be a plausible typo.
pub(crate) fn suggest<'c>(got: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(got, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let src = "a = 1\né = \"x\"\n";
        assert_eq!(line_col(src, 0), (1, 1));
        let at = src.find('=').map(|_| src.rfind('=').unwrap_or(0)).unwrap_or(0);
        assert_eq!(line_col(src, at), (2, 3));
        assert_eq!(line_col(src, 10_000), (3, 1));
    }

    #[test]
    fn suggests_close_keys_only() {
        let keys = ["read", "write", "exec"];
        assert_eq!(suggest("reed", &keys), Some("read"));
        assert_eq!(suggest("wirte", &keys), Some("write"));
        assert_eq!(suggest("network", &keys), None);
    }
}
