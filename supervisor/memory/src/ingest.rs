//! From text to memory: sentences are embedded once, sliced into topic segments (L2, each
//! compressed), and every sentence with substance becomes an L3 item with its own vector,
//! linked to its segment.

use serde::Serialize;

use crate::embed::Embedder;
use crate::slice;
use crate::store::{NewItem, Store, Tier};
use crate::{MemoryError, Provenance};

/// What one ingest stored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Sentences read.
    pub sentences: usize,
    /// L2 segments stored.
    pub segments: usize,
    /// L3 items stored.
    pub items: usize,
    /// Bytes read.
    pub bytes: usize,
    /// Compressed bytes of the segments.
    pub compressed_bytes: usize,
}

/// Whether a sentence is worth its own vector: anything with a fact in it, or of three words
/// or more ("all tests passed" is; "ok", "thanks" are not).
fn substantive(s: &str) -> bool {
    slice::density(s) > 0.0 || s.split_whitespace().count() >= 3
}

/// Stores `text` with `provenance`, in one transaction.
pub fn ingest(
    store: &mut Store,
    embedder: &Embedder,
    text: &str,
    provenance: &Provenance,
) -> Result<Report, MemoryError> {
    let sentences = slice::sentences(text);
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let vectors = embedder.embed(&refs)?;
    let segments = slice::segments(&sentences, &vectors);
    let mut items = Vec::new();
    let mut report =
        Report { sentences: sentences.len(), segments: segments.len(), bytes: text.len(), ..Default::default() };
    for (n, seg) in segments.iter().enumerate() {
        let end = segments.get(n + 1).map_or(sentences.len(), |s| s.first);
        let at = items.len();
        report.compressed_bytes += seg.compressed.len();
        tracing::debug!(first = seg.first, bytes = seg.text.len(), ratio = seg.ratio(), "segment");
        items.push(NewItem {
            tier: Tier::L2,
            text: seg.compressed.clone(),
            original_bytes: seg.text.len() as u64,
            vector: None,
            segment: None,
            provenance: provenance.clone(),
        });
        for i in (seg.first..end).filter(|i| substantive(&sentences[*i])) {
            report.items += 1;
            items.push(NewItem {
                tier: Tier::L3,
                text: sentences[i].clone(),
                original_bytes: sentences[i].len() as u64,
                vector: Some(vectors[i].clone()),
                segment: Some(at),
                provenance: provenance.clone(),
            });
        }
    }
    store.add(items)?;
    Ok(report)
}
