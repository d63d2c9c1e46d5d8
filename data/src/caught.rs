//! Panics of third-party readers that twinhead turns into errors (the
//! parquet decoder and the tokenizers library panic on some corrupt input
//! instead of failing). A panic hook asks [`is_catching`] so that a caught
//! panic is not also reported as a crash.

use std::cell::Cell;

thread_local! {
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`, turning a panic into `Err` with the panic's message.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get().saturating_sub(1)));
    result.map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string())
    })
}

/// Whether the current thread is inside [`catch_panic`]: a panic now
/// becomes an error, so a hook should stay quiet.
pub fn is_catching() -> bool {
    CATCHING.with(|c| c.get() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_the_flag_is_scoped() {
        assert!(!is_catching());
        let inside = catch_panic(is_catching);
        assert_eq!(inside, Ok(true));
        let err = catch_panic(|| -> u32 { panic!("Decoder for dict should have been set") });
        assert_eq!(
            err,
            Err("Decoder for dict should have been set".to_string())
        );
        assert!(!is_catching());
    }
}
