//! TLS ClientHello SNI peek (`sluice::proto::sni::peek_sni`): the first bytes of every
//! connection on an SNI-routed listener (after TLS termination on the Signal preset, the inner
//! ClientHello), sent by whoever connects.
//!
//! Beyond "no panic": a found name is a valid lowercase host name (ASCII letters, digits, `-`,
//! `_`, `.`; at most 253 bytes), so nothing odd can reach the allowlist or a log; the allowlist
//! matches it exactly when one of Signal's names equals it; and a complete answer never turns
//! into a different one when more bytes arrive.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::preset::SIGNAL_HOSTS;
use sluice::proto::sni::{SniAllowlist, SniResult, peek_sni};

fuzz_target!(|data: &[u8]| {
    let result = peek_sni(data);
    if let Ok(SniResult::Found(name)) = &result {
        assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
            "{name:?}"
        );
        let allow = SniAllowlist::signal();
        assert_eq!(allow.allows(name), SIGNAL_HOSTS.contains(&name.as_str()));
    }
    // Streaming: once an answer is final (not Incomplete), appending bytes keeps it.
    if !matches!(result, Ok(SniResult::Incomplete)) {
        let mut more = data.to_vec();
        more.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05]);
        assert_eq!(peek_sni(&more), result);
    }
});
