//! The on-disk store: one redb database per agent (`DIR/memory.redb`). redb was chosen
//! because it is pure Rust with no dependencies, every commit is atomic and durable (one
//! fsync; a torn commit is rolled back on reopen, and pages are checksummed), and it locks
//! the file against a second writer. The vector index is exact: every L3 vector is kept in
//! memory and scored with a dot product (50,000 vectors take milliseconds), so recall never
//! depends on an approximate index, and there is no index to corrupt.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::embed::DIM;
use crate::{MemoryError, Provenance};

const ITEMS: TableDefinition<u64, &[u8]> = TableDefinition::new("items");
const VECTORS: TableDefinition<u64, &[u8]> = TableDefinition::new("vectors");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The database file in a store directory.
pub const FILE: &str = "memory.redb";

/// Which tier an item lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tier {
    /// A compressed segment ("semantic RAM").
    L2,
    /// An embedded chunk (the vector store).
    L3,
}

/// One stored item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Item {
    /// Its id, increasing with age.
    pub id: u64,
    /// Its tier.
    pub tier: Tier,
    /// Its text (compressed, for L2).
    pub text: String,
    /// Bytes of the text it was made from (L2: before compression).
    pub original_bytes: u64,
    /// The L2 segment an L3 chunk belongs to.
    pub segment: Option<u64>,
    /// Where it came from.
    pub provenance: Provenance,
}

/// An item to add. An L3 item carries its vector; `segment` names an L2 item of the same
/// batch by its index.
#[derive(Debug, Clone)]
pub struct NewItem {
    /// The tier.
    pub tier: Tier,
    /// Its text.
    pub text: String,
    /// Bytes of what it was made from.
    pub original_bytes: u64,
    /// Its embedding (L3).
    pub vector: Option<Vec<f32>>,
    /// Index in the batch of its L2 segment.
    pub segment: Option<usize>,
    /// Where it came from.
    pub provenance: Provenance,
}

/// Size limits of one agent's store. Beyond them the oldest L3 items are evicted (and
/// counted); L2 keeps the newest `max_l2` segments, since their text remains in L3.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most L3 items.
    pub max_items: u64,
    /// Most bytes of L3 text and vectors.
    pub max_bytes: u64,
    /// Most L2 segments.
    pub max_l2: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_items: 200_000, max_bytes: 512 << 20, max_l2: 1024 }
    }
}

/// Counts and sizes, for `agentd memory stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// L2 segments.
    pub l2_items: u64,
    /// Their compressed bytes.
    pub l2_bytes: u64,
    /// Their bytes before compression.
    pub l2_original_bytes: u64,
    /// Smallest, mean and largest compression ratio of L2 segments.
    pub l2_ratio_min: f32,
    /// Mean ratio.
    pub l2_ratio_mean: f32,
    /// Largest ratio.
    pub l2_ratio_max: f32,
    /// L3 items.
    pub l3_items: u64,
    /// Their text bytes.
    pub l3_text_bytes: u64,
    /// Their vector bytes.
    pub l3_vector_bytes: u64,
    /// L3 items evicted by the limits, ever.
    pub l3_evicted: u64,
    /// L2 segments retired by the limit, ever.
    pub l2_retired: u64,
    /// The database file's size.
    pub file_bytes: u64,
}

/// What opening the file says when another process has it.
const IN_USE: &str = "in use by another agentd process (a store has one user at a time)";

/// An open store.
pub struct Store {
    db: Database,
    dir: PathBuf,
    limits: Limits,
    /// Every L3 vector, by id, in id order.
    vectors: Vec<(u64, Vec<f32>)>,
    /// The last write failed. redb refuses every write after an I/O error until the file is
    /// opened again, so the next write reopens it first.
    reopen: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).field("vectors", &self.vectors.len()).finish_non_exhaustive()
    }
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_of(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl Store {
    /// Opens (or creates) the store in `dir`, and loads its vectors.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, MemoryError> {
        std::fs::create_dir_all(dir).map_err(|e| MemoryError::io(dir, e))?;
        let err = |reason: String| MemoryError::Store { path: dir.display().to_string(), reason };
        let db = crate::db::open(&dir.join(FILE), IN_USE).map_err(err)?;
        let mut store = Self { db, dir: dir.to_path_buf(), limits, vectors: Vec::new(), reopen: false };
        // Create the tables, so that readers never meet a missing one.
        let tx = store.db.begin_write().map_err(|e| store.err(e))?;
        {
            tx.open_table(ITEMS).map_err(|e| store.err(e))?;
            tx.open_table(VECTORS).map_err(|e| store.err(e))?;
            tx.open_table(META).map_err(|e| store.err(e))?;
        }
        tx.commit().map_err(|e| store.err(e))?;
        let tx = store.db.begin_read().map_err(|e| store.err(e))?;
        let table = tx.open_table(VECTORS).map_err(|e| store.err(e))?;
        for row in table.iter().map_err(|e| store.err(e))? {
            let (k, v) = row.map_err(|e| store.err(e))?;
            let vector = vector_of(v.value());
            if vector.len() != DIM {
                return Err(store.err(format!("item {} has a {}-dimension vector", k.value(), vector.len())));
            }
            store.vectors.push((k.value(), vector));
        }
        drop(table);
        drop(tx);
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> MemoryError {
        MemoryError::Store { path: self.dir.display().to_string(), reason: e.to_string() }
    }

    /// Adds `items` in one transaction (all or none), then applies the limits. Returns the
    /// new ids in order. After a failed add (a full disk, say) the file is reopened first.
    pub fn add(&mut self, items: Vec<NewItem>) -> Result<Vec<u64>, MemoryError> {
        if self.reopen {
            self.reopen_file()?;
        }
        let added = self.add_once(items);
        self.reopen = added.is_err();
        added
    }

    /// Closes the file and opens it again (redb repairs it if a failed commit left it needing
    /// that). Until that succeeds the store holds an empty in-memory database, on which
    /// every read fails for want of its tables rather than answering from nothing.
    fn reopen_file(&mut self) -> Result<(), MemoryError> {
        let empty =
            Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(|e| self.err(e))?;
        drop(std::mem::replace(&mut self.db, empty));
        self.db = crate::db::open(&self.dir.join(FILE), IN_USE).map_err(|e| self.err(e))?;
        self.reopen = false;
        Ok(())
    }

    fn add_once(&mut self, items: Vec<NewItem>) -> Result<Vec<u64>, MemoryError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut ids = Vec::with_capacity(items.len());
        let mut added = Vec::new();
        let (mut l3_count, mut l3_bytes, mut l2_count) = (0u64, 0u64, 0u64);
        {
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            let mut next = meta.get("next_id").map_err(|e| self.err(e))?.map_or(1, |v| v.value());
            let mut table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
            let mut vectors = tx.open_table(VECTORS).map_err(|e| self.err(e))?;
            for item in items {
                if (item.tier == Tier::L3) != item.vector.is_some() {
                    return Err(self.err("an L3 item needs a vector, and an L2 segment has none"));
                }
                let id = next;
                next += 1;
                let segment = item.segment.and_then(|i| ids.get(i).copied());
                let stored = Item {
                    id,
                    tier: item.tier,
                    text: item.text,
                    original_bytes: item.original_bytes,
                    segment,
                    provenance: item.provenance,
                };
                let json = serde_json::to_vec(&stored).map_err(|e| self.err(e))?;
                table.insert(id, json.as_slice()).map_err(|e| self.err(e))?;
                if let Some(v) = item.vector {
                    if v.len() != DIM {
                        return Err(self.err(format!("a vector of {} dimensions, not {DIM}", v.len())));
                    }
                    vectors.insert(id, vector_bytes(&v).as_slice()).map_err(|e| self.err(e))?;
                    added.push((id, v));
                    l3_count += 1;
                    l3_bytes += (stored.text.len() + DIM * 4) as u64;
                } else {
                    l2_count += 1;
                }
                ids.push(id);
            }
            meta.insert("next_id", next).map_err(|e| self.err(e))?;
        }
        self.bump(&tx, [("l3_count", l3_count), ("l3_bytes", l3_bytes), ("l2_count", l2_count)])?;
        let evicted = self.enforce(&tx)?;
        tx.commit().map_err(|e| self.err(e))?;
        self.vectors.extend(added);
        if !evicted.is_empty() {
            let gone: std::collections::HashSet<u64> = evicted.into_iter().collect();
            self.vectors.retain(|(id, _)| !gone.contains(id));
        }
        Ok(ids)
    }

    /// Adds to counters in META (their first use counts what is there).
    fn bump(&self, tx: &redb::WriteTransaction, by: [(&str, u64); 3]) -> Result<(), MemoryError> {
        let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
        if meta.get("l3_count").map_err(|e| self.err(e))?.is_none() {
            drop(meta);
            let (l3, bytes, l2) = self.count_all(tx)?;
            meta = tx.open_table(META).map_err(|e| self.err(e))?;
            // `by` is already in the tables: the scan counted it.
            for (k, v) in [("l3_count", l3), ("l3_bytes", bytes), ("l2_count", l2)] {
                meta.insert(k, v).map_err(|e| self.err(e))?;
            }
            return Ok(());
        }
        for (k, v) in by {
            let old = meta.get(k).map_err(|e| self.err(e))?.map_or(0, |x| x.value());
            meta.insert(k, old.saturating_add(v)).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// (L3 items, their bytes, L2 segments), by a full scan.
    fn count_all(&self, tx: &redb::WriteTransaction) -> Result<(u64, u64, u64), MemoryError> {
        let table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
        let (mut l3, mut bytes, mut l2) = (0, 0, 0);
        for row in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            let item: Item = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            match item.tier {
                Tier::L3 => {
                    l3 += 1;
                    bytes += (item.text.len() + DIM * 4) as u64;
                }
                Tier::L2 => l2 += 1,
            }
        }
        Ok((l3, bytes, l2))
    }

    /// Evicts the oldest L3 items beyond the limits, and retires the oldest L2 segments;
    /// returns the evicted L3 ids. The counters say whether anything must go; only the
    /// oldest items that go are read.
    fn enforce(&self, tx: &redb::WriteTransaction) -> Result<Vec<u64>, MemoryError> {
        let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let get = |m: &redb::Table<&str, u64>, k: &str| m.get(k).ok().flatten().map_or(0, |v| v.value());
        let (mut l3, mut bytes, mut l2) = (get(&meta, "l3_count"), get(&meta, "l3_bytes"), get(&meta, "l2_count"));
        let over = |l3: u64, bytes: u64| l3 > self.limits.max_items || bytes > self.limits.max_bytes;
        if !over(l3, bytes) && l2 <= self.limits.max_l2 {
            return Ok(Vec::new());
        }
        let mut table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
        let mut vectors = tx.open_table(VECTORS).map_err(|e| self.err(e))?;
        let (mut evict, mut retire) = (Vec::new(), Vec::new());
        for row in table.iter().map_err(|e| self.err(e))? {
            if !over(l3, bytes) && l2 <= self.limits.max_l2 {
                break;
            }
            let (k, v) = row.map_err(|e| self.err(e))?;
            let item: Item = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            match item.tier {
                Tier::L3 if over(l3, bytes) => {
                    evict.push(k.value());
                    l3 -= 1;
                    bytes = bytes.saturating_sub((item.text.len() + DIM * 4) as u64);
                }
                Tier::L2 if l2 > self.limits.max_l2 => {
                    retire.push(k.value());
                    l2 -= 1;
                }
                _ => {}
            }
        }
        for id in evict.iter().chain(&retire) {
            table.remove(id).map_err(|e| self.err(e))?;
            vectors.remove(id).map_err(|e| self.err(e))?;
        }
        let evicted_total = get(&meta, "l3_evicted") + evict.len() as u64;
        let retired_total = get(&meta, "l2_retired") + retire.len() as u64;
        for (k, v) in [
            ("l3_count", l3),
            ("l3_bytes", bytes),
            ("l2_count", l2),
            ("l3_evicted", evicted_total),
            ("l2_retired", retired_total),
        ] {
            meta.insert(k, v).map_err(|e| self.err(e))?;
        }
        Ok(evict)
    }

    /// Reads one item.
    pub fn get(&self, id: u64) -> Result<Option<Item>, MemoryError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
        let Some(v) = table.get(id).map_err(|e| self.err(e))? else { return Ok(None) };
        serde_json::from_slice(v.value()).map(Some).map_err(|e| self.err(e))
    }

    /// The `k` L3 items most similar to `query` (a unit vector), best first, with scores.
    pub fn search(&self, query: &[f32], k: usize) -> Result<Vec<(f32, Item)>, MemoryError> {
        let mut scored: Vec<(f32, u64)> =
            self.vectors.iter().map(|(id, v)| (crate::embed::cosine(query, v), *id)).collect();
        let k = k.min(scored.len());
        if k == 0 {
            return Ok(Vec::new());
        }
        scored.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        scored.truncate(k);
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().filter_map(|(s, id)| self.get(id).transpose().map(|r| r.map(|i| (s, i)))).collect()
    }

    /// Counts, sizes and ratios.
    pub fn stats(&self) -> Result<Stats, MemoryError> {
        let mut s = Stats::default();
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
        let mut ratios = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            let item: Item = serde_json::from_slice(v.value()).map_err(|e| self.err(e))?;
            match item.tier {
                Tier::L2 => {
                    s.l2_items += 1;
                    s.l2_bytes += item.text.len() as u64;
                    s.l2_original_bytes += item.original_bytes;
                    ratios.push(item.text.len() as f32 / item.original_bytes.max(1) as f32);
                }
                Tier::L3 => {
                    s.l3_items += 1;
                    s.l3_text_bytes += item.text.len() as u64;
                }
            }
        }
        s.l3_vector_bytes =
            tx.open_table(VECTORS).and_then(|t| Ok(t.len()?)).map_err(|e| self.err(e))? * (DIM as u64 * 4);
        let meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let counter = |k: &str| meta.get(k).ok().flatten().map_or(0, |v| v.value());
        s.l3_evicted = counter("l3_evicted");
        s.l2_retired = counter("l2_retired");
        if !ratios.is_empty() {
            s.l2_ratio_min = ratios.iter().copied().fold(f32::MAX, f32::min);
            s.l2_ratio_max = ratios.iter().copied().fold(0.0, f32::max);
            s.l2_ratio_mean = ratios.iter().sum::<f32>() / ratios.len() as f32;
        }
        s.file_bytes = std::fs::metadata(self.dir.join(FILE)).map_or(0, |m| m.len());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agentd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn unit(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; DIM];
        v[i % DIM] = 1.0;
        v
    }

    fn prov(source: Source) -> Provenance {
        Provenance { source, origin: "test".into(), stored_ms: 0 }
    }

    fn l3(text: &str, v: Vec<f32>, segment: Option<usize>) -> NewItem {
        NewItem {
            tier: Tier::L3,
            text: text.into(),
            original_bytes: text.len() as u64,
            vector: Some(v),
            segment,
            provenance: prov(Source::Model),
        }
    }

    #[test]
    fn items_persist_across_a_reopen_and_search_is_exact() {
        let dir = scratch("persist");
        {
            let mut s = Store::open(&dir, Limits::default()).expect("open");
            let seg = NewItem {
                tier: Tier::L2,
                text: "short".into(),
                original_bytes: 20,
                vector: None,
                segment: None,
                provenance: prov(Source::Tool { call_id: "c-1".into(), tool: "search".into() }),
            };
            let ids = s.add(vec![seg, l3("alpha", unit(0), Some(0)), l3("beta", unit(1), Some(0))]).expect("add");
            assert_eq!(ids, [1, 2, 3]);
        }
        let s = Store::open(&dir, Limits::default()).expect("reopen");
        let hits = s.search(&unit(1), 2).expect("search");
        assert_eq!(hits[0].1.text, "beta");
        assert!((hits[0].0 - 1.0).abs() < 1e-6 && hits[1].0.abs() < 1e-6);
        assert_eq!(hits[0].1.segment, Some(1), "linked to its L2 segment");
        let seg = s.get(1).expect("get").expect("the segment");
        assert_eq!(seg.provenance.source, Source::Tool { call_id: "c-1".into(), tool: "search".into() });
        let st = s.stats().expect("stats");
        assert_eq!((st.l2_items, st.l3_items), (1, 2));
        assert!((st.l2_ratio_mean - 0.25).abs() < 1e-6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The child half of the crash test: commits one batch, then dies (abort, no unwinding,
    /// no destructors) halfway through writing the next.
    fn crash_child(dir: &Path) -> ! {
        let mut s = Store::open(dir, Limits::default()).expect("open");
        s.add((0..10).map(|i| l3(&format!("kept {i}"), unit(i), None)).collect()).expect("first batch");
        let tx = s.db.begin_write().expect("begin");
        {
            let mut table = tx.open_table(ITEMS).expect("items");
            let mut vectors = tx.open_table(VECTORS).expect("vectors");
            for id in 100..5000u64 {
                table.insert(id, b"{\"torn\": true}".as_slice()).expect("insert");
                vectors.insert(id, vector_bytes(&unit(3)).as_slice()).expect("insert");
            }
        }
        std::process::abort();
    }

    #[test]
    fn a_crash_mid_write_leaves_the_last_commit() {
        const CHILD: &str = "AGENTD_STORE_CRASH_CHILD";
        if let Some(dir) = std::env::var_os(CHILD) {
            crash_child(Path::new(&dir));
        }
        let dir = scratch("crash");
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new(exe)
            .args(["store::tests::a_crash_mid_write_leaves_the_last_commit", "--exact", "--test-threads=1"])
            .env(CHILD, &dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run the child");
        assert!(!status.success(), "the child must die mid-write");
        let mut s = Store::open(&dir, Limits::default()).expect("reopens after the crash");
        let st = s.stats().expect("stats");
        assert_eq!(st.l3_items, 10, "exactly the committed batch");
        assert_eq!(s.search(&unit(3), 1).expect("search")[0].1.text, "kept 3");
        s.add(vec![l3("after", unit(20), None)]).expect("writes again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_batch_stores_nothing() {
        let dir = scratch("atomic");
        let mut s = Store::open(&dir, Limits::default()).expect("open");
        let err = s.add(vec![l3("ok", unit(0), None), l3("bad", vec![1.0; 3], None)]);
        assert!(err.is_err());
        let mut no_vector = l3("no vector", unit(0), None);
        no_vector.vector = None;
        assert!(s.add(vec![no_vector]).is_err(), "an L3 item needs its vector");
        assert_eq!(s.stats().expect("stats").l3_items, 0, "all or nothing");
        assert!(s.search(&unit(0), 5).expect("search").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn limits_evict_the_oldest_and_count_them() {
        let dir = scratch("limits");
        let limits = Limits { max_items: 3, max_bytes: u64::MAX, max_l2: 1 };
        let mut s = Store::open(&dir, limits).expect("open");
        for i in 0..5 {
            let seg = NewItem {
                tier: Tier::L2,
                text: format!("s{i}"),
                original_bytes: 4,
                vector: None,
                segment: None,
                provenance: prov(Source::Task),
            };
            s.add(vec![seg, l3(&format!("item {i}"), unit(i), Some(0))]).expect("add");
        }
        let st = s.stats().expect("stats");
        assert_eq!((st.l3_items, st.l3_evicted, st.l2_items, st.l2_retired), (3, 2, 1, 4));
        let texts: Vec<String> = s.search(&unit(0), 5).expect("search").into_iter().map(|(_, i)| i.text).collect();
        assert!(!texts.contains(&"item 0".to_string()) && texts.contains(&"item 4".to_string()), "{texts:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Run by the next test in a user and mount namespace of its own.
    #[test]
    #[ignore = "run by a_full_disk_does_not_end_the_store, in a new mount namespace"]
    fn memory_store_on_a_full_disk() {
        let dir = agentd_tests::unit::given_dir("a_full_disk_does_not_end_the_store");
        agentd_tests::unit::mount_small_tmpfs(&dir);
        let mut s = Store::open(&dir.join("memory"), Limits::default()).expect("open");
        s.add(vec![l3("before", unit(0), None)]).expect("first add");
        let fill = agentd_tests::unit::fill_disk(&dir);
        let big = "x".repeat(64 * 1024);
        assert!((0..32).any(|i| s.add(vec![l3(&big, unit(i), None)]).is_err()), "no add failed on a full disk");
        std::fs::remove_file(&fill).expect("unfill");
        let ids = s.add(vec![l3("after", unit(2), None)]).expect("an add after the disk has room");
        assert_eq!(s.get(ids[0]).expect("get").map(|i| i.text), Some("after".to_string()));
        assert_eq!(s.search(&unit(0), 1).expect("search")[0].1.text, "before");
    }

    /// redb refuses all writes after one I/O error until reopened: a disk that fills and
    /// clears must not leave the memory store unable to learn anything more.
    #[test]
    fn a_full_disk_does_not_end_the_store() {
        let args = ["--user", "--map-root-user", "--mount"];
        agentd_tests::unit::run_in_namespaces("store::tests::memory_store_on_a_full_disk", &args, "memory-full");
    }
}
