//! The control protocols: a request line on the control socket (`control::read_request`, then
//! `admission::Command::parse`, what `sluicectl` sends), and a supervisor-to-worker line
//! (`wire::ControlMsg::decode`, one JSON object a line).
//!
//! `dest` rules are parsed without DNS (IP literals only; a name is refused as unresolvable) so
//! the fuzzer never waits on a resolver. Beyond "no panic": whatever parses is encoded back to
//! a line that parses to the same command or message.

#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use sluice::admission::Command;
use sluice::cidr::canonical;
use sluice::config::HostPort;
use sluice::control::read_request;
use sluice::wire::ControlMsg;

/// `admission::parse_dest` without the resolver.
fn literal_dest(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(vec![SocketAddr::new(canonical(sa.ip()), sa.port())]);
    }
    let hp: HostPort = s.parse()?;
    Err(format!("`{}` is not resolved while fuzzing", hp.host))
}

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = read_request(data) {
        if let Ok(Some(cmd)) = Command::parse_with(&line, literal_dest) {
            let encoded = cmd.encode();
            assert_eq!(
                Command::parse_with(&encoded, literal_dest),
                Ok(Some(cmd)),
                "{encoded:?}"
            );
        }
    }
    if let Ok(line) = std::str::from_utf8(data) {
        if let Some(msg) = ControlMsg::decode(line) {
            let encoded = msg.encode();
            assert_eq!(ControlMsg::decode(&encoded), Some(msg), "{encoded:?}");
        }
    }
});
