//! Parallel work of our own kernels (batched matmul, attention) on candle's worker threads,
//! the ones its kernels use: a second pool would compete with its spinning workers for the
//! cores.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, PoisonError};

use candle_core::{Error, Result};

/// Runs `f` on every item `0..n`, spread over candle's pool; the first error, if any. A panic
/// in `f` is caught and becomes an error: unwinding into candle's pool would poison its lock,
/// and with it every later step of every conversation.
pub fn each(n: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    candle_core::utils::barrier_pool().execute_chunked(n, |items| {
        for item in items {
            let done = catch_unwind(AssertUnwindSafe(|| f(item)))
                .unwrap_or_else(|_| Err(Error::Msg("a model worker thread panicked".into())));
            if let Err(e) = done {
                failed.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
                return;
            }
        }
    });
    failed.into_inner().unwrap_or_else(PoisonError::into_inner).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every item runs once; an error or a panic in one comes back as an error, and the pool
    /// still works after it.
    #[test]
    fn items_run_once_and_errors_and_panics_come_back() {
        let count = AtomicUsize::new(0);
        super::each(100, |_| {
            count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .expect("all run");
        assert_eq!(count.into_inner(), 100);
        let e = super::each(10, |i| if i == 7 { candle_core::bail!("item {i}") } else { Ok(()) });
        assert!(e.is_err_and(|e| e.to_string().contains("item 7")));
        let e = super::each(10, |i| if i == 3 { panic!("a bug") } else { Ok(()) });
        assert!(e.is_err_and(|e| e.to_string().contains("panicked")));
        super::each(4, |_| Ok(())).expect("the pool still works after a panic");
    }
}
