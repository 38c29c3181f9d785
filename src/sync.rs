//! The one way courier takes a `std::sync::Mutex` or `RwLock`.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, going on when a panic poisoned it: the panic was reported where it
/// happened, and every value courier keeps under a std mutex is left whole between
/// statements (counters, small maps, the breaker's state), so the worker keeps delivering.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads under `lock`, going on when a panic poisoned it (as `lock` does).
pub(crate) fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes under `lock`, going on when a panic poisoned it (as `lock` does).
pub(crate) fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
