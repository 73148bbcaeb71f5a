//! The one integration-test binary: every area's tests live in `src/tests/<area>.rs` (aya's
//! layout) and are compiled here, where cargo provides the `holder` helper binary's path.

#[path = "../src/tests/mod.rs"]
mod tests;
