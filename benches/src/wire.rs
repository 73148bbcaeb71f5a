//! What a load generator tells the orchestrator, one line at a time on its stdout:
//!
//! - `MARK start <label>` / `MARK end <label>`: a measurement window opens or closes now; the
//!   orchestrator samples every CPU counter when it reads the line (a few ms late at most);
//! - `RESULT <json>`: one [`LoadResult`];
//! - anything else is progress for humans and is passed through to stderr.
//!
//! The load generators run as separate processes so that their CPU time is measured on its own
//! and so that idle connections can be spread over several processes (one file limit each).

use std::io::Write as _;

use serde::{Deserialize, Serialize};

/// A latency distribution summary, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Reads the percentiles out of a histogram recorded in microseconds.
    pub fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let q = |q: f64| h.value_at_quantile(q) as f64;
        Latency {
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: h.max() as f64,
            mean_us: h.mean(),
        }
    }
}

/// One result line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LoadResult {
    /// Open-loop request/response at one offered rate.
    Rr {
        rate: u32,
        secs: f64,
        conns: usize,
        /// Messages sent during the measured window.
        sent: u64,
        /// Of those, answered before the end of the drain.
        received: u64,
        /// Writes that found the socket buffer full (the relay did not keep up).
        blocked_writes: u64,
        /// Latency from the *intended* send time to the full echo.
        latency: Latency,
    },
    /// Connect, one exchange, close, with a fixed number in flight.
    Connrate {
        concurrency: usize,
        secs: f64,
        completed: u64,
        errors: u64,
        /// Connect start to echo received.
        latency: Latency,
    },
    /// A few connections moving paced blocks both ways beside the chat ([`crate::media`]).
    Media {
        conns: usize,
        secs: f64,
        /// What all of them offered together, one way, Mbit/s.
        offered_mbps: f64,
        /// Bytes written, and of those echoed back before the end.
        sent: u64,
        echoed: u64,
        /// Connections that failed or did not end with the echo server's close.
        errors: u64,
    },
    /// Idle relayed connections opened and checked with one echoed byte each.
    Idle {
        attempted: usize,
        held: usize,
        failed: usize,
        setup_secs: f64,
    },
    /// One attacking host's TLS handshake flood ([`crate::tlsflood::flood`]).
    TlsFlood {
        threads: usize,
        secs: f64,
        attempts: u64,
        /// Full handshakes completed.
        handshakes: u64,
        /// Reset or closed before the handshake ended.
        refused: u64,
        timeouts: u64,
        errors: u64,
    },
    /// The legitimate client's connections during one phase ([`crate::tlsflood::probe`]).
    TlsProbe {
        phase: String,
        secs: f64,
        attempts: u64,
        ok: u64,
        resumed: u64,
        refused: u64,
        timeouts: u64,
        errors: u64,
        /// Before connect to the end of the handshake.
        handshake: Latency,
        /// Before connect to the 64-byte echo.
        exchange: Latency,
    },
}

/// Prints a `MARK` line and flushes at once: the orchestrator samples when it reads it.
pub fn mark(what: &str, label: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "MARK {what} {label}");
    let _ = out.flush();
}

/// Prints a `RESULT` line.
pub fn result(r: &LoadResult) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "RESULT {}",
        serde_json::to_string(r).expect("results serialise")
    );
    let _ = out.flush();
}

/// A parsed line of a load generator's stdout.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Mark { start: bool, label: String },
    Result(LoadResult),
    Other(String),
}

impl Line {
    pub fn parse(line: &str) -> Line {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("MARK ") {
            let (what, label) = rest.split_once(' ').unwrap_or((rest, ""));
            return Line::Mark {
                start: what == "start",
                label: label.to_owned(),
            };
        }
        if let Some(json) = line.strip_prefix("RESULT ")
            && let Ok(r) = serde_json::from_str(json)
        {
            return Line::Result(r);
        }
        Line::Other(line.to_owned())
    }
}

/// Builds the histogram every load generator records into: 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(input: &str, expect: &str) {
        assert_eq!(format!("{:?}", Line::parse(input)), expect);
    }

    #[test]
    fn lines() {
        check(
            "MARK start 20000\n",
            r#"Mark { start: true, label: "20000" }"#,
        );
        check("MARK end x", r#"Mark { start: false, label: "x" }"#);
        check("hello", r#"Other("hello")"#);
        check(
            r#"RESULT {"kind":"idle","attempted":3,"held":2,"failed":1,"setup_secs":0.5}"#,
            "Result(Idle { attempted: 3, held: 2, failed: 1, setup_secs: 0.5 })",
        );
        let media = LoadResult::Media {
            conns: 4,
            secs: 9.5,
            offered_mbps: 1000.0,
            sent: 1_187_500_000,
            echoed: 1_187_000_000,
            errors: 0,
        };
        let line = format!("RESULT {}", serde_json::to_string(&media).unwrap());
        assert_eq!(Line::parse(&line), Line::Result(media));
    }
}
