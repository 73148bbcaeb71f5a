//! PROXY protocol v1 (text) and v2 (binary): parse what a load balancer sends, encode what an
//! upstream expects. Sans-IO: the worker hands in the bytes it has received so far and gets back
//! either a header and its exact length, "need more bytes", or an error.
//!
//! The spec is HAProxy's `proxy-protocol.txt`. Parsing is delegated to the `ppp` crate, framed by
//! this module so that it is strict and streaming-safe:
//! - the first bytes must be a prefix of a v1 (`"PROXY "`) or v2 (12-byte) signature, otherwise
//!   the input is rejected at once ([`ProxyError::NotProxy`]), never reported as incomplete;
//! - v1: a line of at most [`MAX_V1_LEN`] bytes ending in CRLF, `TCP4`, `TCP6` or `UNKNOWN`;
//!   while the line is incomplete only characters that can occur in a valid line are accepted,
//!   and `ppp` only ever sees a complete line (its own partial-input detection misreports a few
//!   cut points as terminal errors);
//! - v2: version 2, `PROXY` or `LOCAL`, only the address-family/protocol bytes the spec lists,
//!   at most [`MAX_HEADER_LEN`] bytes in total, well-formed TLVs (their content is ignored; a
//!   CRC32C TLV is not verified). A `PROXY` command over a datagram protocol is rejected: Sluice
//!   relays TCP.
//!
//! Encoding maps v4-mapped IPv6 addresses to IPv4 first; when an address is unknown or the two
//! families still differ, v1 sends `PROXY UNKNOWN` and v2 sends a `LOCAL` command with no
//! addresses, so the upstream uses the connection's own endpoints.
//!
//! API boundary: nothing here reads a socket, allocates per byte, or logs (an address must never
//! reach a log line); parsed addresses are returned as given, a v4-mapped IPv6 source is not
//! unmapped.

use std::io::Write as _;
use std::net::SocketAddr;

use ppp::{v1, v2};

use crate::config::SendProxy;

/// Longest v1 header, CRLF included (the spec's worst case: `PROXY UNKNOWN` with two full IPv6
/// addresses and ports).
pub(crate) const MAX_V1_LEN: usize = 107;

/// Longest header accepted at all: a v2 header is 16 bytes plus its declared length, which may
/// announce up to 64 KiB of TLVs; nothing a relay needs is that long.
pub const MAX_HEADER_LEN: usize = 4096;

/// The v1 signature, the separator included.
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// The v2 signature.
const V2_SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;

/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
const V2_FIXED_LEN: usize = 16;

/// The shortest complete header of either version (`PROXY UNKNOWN\r\n`).
const MIN_HEADER_LEN: usize = 15;

/// What [`parse`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header: the first `len` bytes are the header; the rest belongs to the client's stream.
    Complete { len: usize, header: ProxyHeader },
    /// Everything so far can start a valid header; read more and call [`parse`] again on all of it.
    Incomplete,
}

/// The addresses a PROXY header carries.
///
/// `source` and `destination` are `None` for v1 `UNKNOWN`, a v2 `LOCAL` command, and the v2
/// `UNSPEC` and unix families: the caller then uses the connection's own endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client as seen by the sender of the header.
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
    /// A v2 `LOCAL` command: the sender's own connection (a health check), not a relayed client.
    pub local: bool,
}

/// Why a PROXY header is refused (always the client's doing: the header comes from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY header longer than {max} bytes")]
    TooLong { max: usize },
    #[error("malformed PROXY v1 header: {0}")]
    MalformedV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    MalformedV2(&'static str),
    #[error("PROXY v2 header has unsupported version {0}")]
    V2Version(u8),
    #[error("PROXY v2 header has unknown command {0:#x}")]
    V2Command(u8),
    #[error("PROXY v2 header has unknown address family and protocol {0:#04x}")]
    V2Family(u8),
    #[error("PROXY v2 header describes a datagram connection, not a stream")]
    V2Datagram,
}

/// Parses the PROXY header at the start of `buf`, which holds every byte received so far.
///
/// On [`Parsed::Complete`] the caller consumes exactly `len` bytes and relays the rest. On
/// [`Parsed::Incomplete`] it reads more and calls again with the whole buffer. An error is final:
/// more bytes cannot fix it.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.is_empty() {
        Ok(Parsed::Incomplete)
    } else if starts_like(buf, V1_SIGNATURE) {
        parse_v1(buf)
    } else if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        Err(ProxyError::NotProxy)
    }
}

/// How many more bytes [`parse`] needs at least before it can say more than
/// [`Parsed::Incomplete`]; 0 when it already can (a complete header or an error).
///
/// Exact for v2 once its 16-byte fixed part is in; a lower bound for v1, whose end is a CRLF.
pub fn needed_hint(buf: &[u8]) -> usize {
    match parse(buf) {
        Ok(Parsed::Incomplete) => {}
        Ok(Parsed::Complete { .. }) | Err(_) => return 0,
    }
    if starts_like(buf, V2_SIGNATURE) && !buf.is_empty() {
        if buf.len() < V2_FIXED_LEN {
            return V2_FIXED_LEN - buf.len();
        }
        return V2_FIXED_LEN + v2_declared_len(buf) - buf.len();
    }
    MIN_HEADER_LEN.saturating_sub(buf.len()).max(1)
}

/// Appends the header `version` calls for to `out`; nothing for [`SendProxy::None`].
///
/// v4-mapped IPv6 addresses are sent as IPv4. Unknown addresses, or two of different families,
/// give `PROXY UNKNOWN\r\n` (v1) or a `LOCAL` command without addresses (v2).
pub fn encode(
    version: SendProxy,
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    out: &mut Vec<u8>,
) {
    let pair = match (source.map(unmap), destination.map(unmap)) {
        (Some(s), Some(d)) if s.is_ipv4() == d.is_ipv4() => Some((s, d)),
        _ => None,
    };
    match version {
        SendProxy::None => {}
        SendProxy::V1 => {
            let addresses = pair.map_or(v1::Addresses::Unknown, v1::Addresses::from);
            // Writing into a Vec cannot fail; `Addresses` renders the whole line, CRLF included.
            let _ = write!(out, "{addresses}");
        }
        SendProxy::V2 => encode_v2(pair, out),
    }
}

/// Writes a v2 header straight into `out`: no intermediate buffer.
fn encode_v2(pair: Option<(SocketAddr, SocketAddr)>, out: &mut Vec<u8>) {
    out.extend_from_slice(V2_SIGNATURE);
    match pair {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            out.extend_from_slice(&[0x21, 0x11, 0, 12]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
            out.extend_from_slice(&[0x21, 0x21, 0, 36]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        // LOCAL, UNSPEC, no address block.
        _ => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is unchanged.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Whether `buf` and `signature` agree on their common length.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(MAX_V1_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        check_v1_partial(window)?;
        return if buf.len() >= MAX_V1_LEN {
            Err(ProxyError::TooLong { max: MAX_V1_LEN })
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = &buf[..=lf];
    // The signature has no LF, so `lf` is past it and `lf >= 1`.
    if line[lf - 1] != b'\r' {
        return Err(ProxyError::MalformedV1("line does not end in crlf"));
    }
    check_v1_partial(&line[..lf - 1])?;
    let parsed = v1::Header::try_from(line).map_err(v1_fault)?;
    if parsed.header.len() != line.len() {
        return Err(ProxyError::MalformedV1("line does not end in crlf"));
    }
    let header = match parsed.addresses {
        v1::Addresses::Tcp4(a) => ProxyHeader {
            source: Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            destination: Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
            local: false,
        },
        v1::Addresses::Tcp6(a) => ProxyHeader {
            source: Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            destination: Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
            local: false,
        },
        v1::Addresses::Unknown => ProxyHeader {
            source: None,
            destination: None,
            local: false,
        },
    };
    Ok(Parsed::Complete {
        len: line.len(),
        header,
    })
}

/// Rejects a v1 line early when it holds a byte no valid line can: after the signature only
/// letters, digits, `.`, `:` and spaces, and a CR only as the last byte (its LF not yet here).
fn check_v1_partial(line: &[u8]) -> Result<(), ProxyError> {
    let rest = line.get(V1_SIGNATURE.len()..).unwrap_or_default();
    let body = rest.strip_suffix(b"\r").unwrap_or(rest);
    if body
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b' '))
    {
        Ok(())
    } else {
        Err(ProxyError::MalformedV1("unexpected character"))
    }
}

/// A reason for a v1 error, without `ppp`'s message (capitalised, and with a trailing period).
fn v1_fault(error: v1::BinaryParseError) -> ProxyError {
    use v1::ParseError as E;
    ProxyError::MalformedV1(match error {
        v1::BinaryParseError::InvalidUtf8(_) => "not ascii",
        v1::BinaryParseError::Parse(e) => match e {
            E::HeaderTooLong => "line too long",
            E::InvalidProtocol | E::MissingProtocol => "protocol is not TCP4, TCP6 or UNKNOWN",
            E::InvalidSourceAddress(_) => "invalid source address",
            E::InvalidDestinationAddress(_) => "invalid destination address",
            E::InvalidSourcePort(_) => "invalid source port",
            E::InvalidDestinationPort(_) => "invalid destination port",
            E::MissingSourceAddress
            | E::MissingDestinationAddress
            | E::MissingSourcePort
            | E::MissingDestinationPort => "missing address or port",
            E::InvalidPrefix
            | E::Partial
            | E::MissingPrefix
            | E::MissingNewLine
            | E::InvalidSuffix => "fields do not end in crlf",
        },
    })
}

/// The length field of a v2 header whose fixed part is in `buf`.
fn v2_declared_len(buf: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([buf[14], buf[15]]))
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete);
    }
    let version_command = buf[12];
    if version_command >> 4 != 2 {
        return Err(ProxyError::V2Version(version_command >> 4));
    }
    if version_command & 0x0f > 1 {
        return Err(ProxyError::V2Command(version_command & 0x0f));
    }
    // The spec lists these and says receivers must reject any other value.
    let family = buf[13];
    if !matches!(family, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) {
        return Err(ProxyError::V2Family(family));
    }
    let len = V2_FIXED_LEN + v2_declared_len(buf);
    if len > MAX_HEADER_LEN {
        return Err(ProxyError::TooLong {
            max: MAX_HEADER_LEN,
        });
    }
    if buf.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let parsed = v2::Header::try_from(&buf[..len]).map_err(v2_fault)?;
    if parsed.tlvs().any(|tlv| tlv.is_err()) {
        return Err(ProxyError::MalformedV2("truncated tlv"));
    }
    let header = match (parsed.command, parsed.addresses) {
        (v2::Command::Local, _) => ProxyHeader {
            source: None,
            destination: None,
            local: true,
        },
        (v2::Command::Proxy, _) if parsed.protocol == v2::Protocol::Datagram => {
            return Err(ProxyError::V2Datagram);
        }
        (v2::Command::Proxy, v2::Addresses::IPv4(a)) => ProxyHeader {
            source: Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            destination: Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
            local: false,
        },
        (v2::Command::Proxy, v2::Addresses::IPv6(a)) => ProxyHeader {
            source: Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            destination: Some(SocketAddr::new(
                a.destination_address.into(),
                a.destination_port,
            )),
            local: false,
        },
        (v2::Command::Proxy, v2::Addresses::Unix(_) | v2::Addresses::Unspecified) => ProxyHeader {
            source: None,
            destination: None,
            local: false,
        },
    };
    Ok(Parsed::Complete { len, header })
}

/// A reason for a v2 error that survived the checks in [`parse_v2`].
fn v2_fault(error: v2::ParseError) -> ProxyError {
    use v2::ParseError as E;
    match error {
        E::InvalidAddresses(..) => {
            ProxyError::MalformedV2("length too short for the address family")
        }
        E::InvalidTLV(..) | E::Leftovers(..) => ProxyError::MalformedV2("truncated tlv"),
        E::Version(v) => ProxyError::V2Version(v >> 4),
        E::Command(c) => ProxyError::V2Command(c),
        E::AddressFamily(f) | E::Protocol(f) => ProxyError::V2Family(f),
        E::Incomplete(..) | E::Partial(..) | E::Prefix => ProxyError::MalformedV2("truncated"),
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    /// Renders what [`parse`] says about `input` and compares it with `expect`:
    /// `incomplete`, `error: <message>`, or `<len> <source> <destination>[ local]` with `-` for
    /// an absent address.
    #[track_caller]
    fn check(input: &[u8], expect: &str) {
        assert_eq!(
            render(parse(input)),
            expect,
            "input {:?}",
            input.escape_ascii().to_string()
        );
    }

    fn render(result: Result<Parsed, ProxyError>) -> String {
        let addr = |a: Option<SocketAddr>| a.map_or("-".to_owned(), |a| a.to_string());
        match result {
            Ok(Parsed::Incomplete) => "incomplete".to_owned(),
            Ok(Parsed::Complete { len, header }) => {
                let mut s = format!("{len} {} {}", addr(header.source), addr(header.destination));
                if header.local {
                    s.push_str(" local");
                }
                s
            }
            Err(e) => format!("error: {e}"),
        }
    }

    /// Every strict prefix of a complete header is incomplete, and the header followed by the
    /// client's first bytes parses to the same result as the header alone.
    #[track_caller]
    fn check_streaming(header: &[u8], expect: &str) {
        for cut in 0..header.len() {
            check(&header[..cut], "incomplete");
            assert!(needed_hint(&header[..cut]) >= 1);
            assert!(needed_hint(&header[..cut]) <= header.len() - cut);
        }
        check(header, expect);
        let mut with_payload = header.to_vec();
        with_payload.extend_from_slice(b"\x16\x03\x01\x02\x00GET / HTTP/1.1\r\n\r\n");
        check(&with_payload, expect);
        assert_eq!(needed_hint(header), 0);
    }

    /// Encodes, checks the exact bytes, then parses them back to the expected rendering.
    #[track_caller]
    fn check_encode(
        version: SendProxy,
        source: Option<&str>,
        destination: Option<&str>,
        expect_bytes: &[u8],
        expect_parsed: &str,
    ) {
        let mut out = b"prefix".to_vec();
        encode(
            version,
            source.map(|s| s.parse().unwrap()),
            destination.map(|s| s.parse().unwrap()),
            &mut out,
        );
        assert_eq!(
            out[6..].escape_ascii().to_string(),
            expect_bytes.escape_ascii().to_string()
        );
        if version != SendProxy::None {
            check_streaming(&out[6..], expect_parsed);
        }
    }

    fn v2(version_command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(version_command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    const V4_BLOCK: [u8; 12] = [192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb];

    fn v6_block() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        b.extend_from_slice(
            &"2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        b.extend_from_slice(&[0xdc, 0x04, 0x01, 0xbb]);
        b
    }

    #[test]
    fn v1_spec_examples() {
        // proxy-protocol.txt, section 2.1.
        check_streaming(
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "47 192.168.0.1:56324 192.168.0.11:443",
        );
        check_streaming(b"PROXY UNKNOWN\r\n", "15 - -");
        check_streaming(
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            "56 255.255.255.255:65535 255.255.255.255:65535",
        );
        check_streaming(
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            "104 [ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535 [ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        );
        // The worst case is exactly the limit.
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), MAX_V1_LEN);
        check_streaming(worst, "107 - -");
        check_streaming(
            b"PROXY TCP6 2001:db8::1 ::1 1 0\r\n",
            "32 [2001:db8::1]:1 [::1]:0",
        );
    }

    #[test]
    fn v1_rejects_garbage() {
        check(b"G", "error: not a PROXY protocol header");
        check(b"GET / HTTP/1.1\r\n", "error: not a PROXY protocol header");
        check(b"\x16\x03\x01", "error: not a PROXY protocol header");
        check(b"PROXI", "error: not a PROXY protocol header");
        check(b"proxy TCP4", "error: not a PROXY protocol header");
        check(b"PROXY\r\n", "error: not a PROXY protocol header");
        check(
            b"PROXY TCP4 \x16",
            "error: malformed PROXY v1 header: unexpected character",
        );
        check(
            b"PROXY TCP4 1.2.3.4\r5",
            "error: malformed PROXY v1 header: unexpected character",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            "error: malformed PROXY v1 header: line does not end in crlf",
        );
        check(
            b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
            "error: malformed PROXY v1 header: protocol is not TCP4, TCP6 or UNKNOWN",
        );
        check(
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            "error: malformed PROXY v1 header: protocol is not TCP4, TCP6 or UNKNOWN",
        );
        check(
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            "error: malformed PROXY v1 header: invalid source address",
        );
        check(
            b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
            "error: malformed PROXY v1 header: invalid destination address",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            "error: malformed PROXY v1 header: invalid source port",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n",
            "error: malformed PROXY v1 header: invalid destination port",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n",
            "error: malformed PROXY v1 header: invalid destination port",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            "error: malformed PROXY v1 header: invalid destination port",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",
            "error: malformed PROXY v1 header: missing address or port",
        );
        check(
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            "error: malformed PROXY v1 header: fields do not end in crlf",
        );
        check(
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            "error: malformed PROXY v1 header: protocol is not TCP4, TCP6 or UNKNOWN",
        );
        check(
            b"PROXY \r\n",
            "error: malformed PROXY v1 header: protocol is not TCP4, TCP6 or UNKNOWN",
        );
    }

    #[test]
    fn v1_length_cap() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(MAX_V1_LEN - 1, b'f');
        check(&long, "incomplete");
        long.push(b'f');
        check(&long, "error: PROXY header longer than 107 bytes");
        // A CRLF just past the limit does not help.
        long.extend_from_slice(b"\r\n");
        check(&long, "error: PROXY header longer than 107 bytes");
    }

    #[test]
    fn v2_addresses() {
        // TCP over IPv4, PROXY command (spec section 2.2 layout).
        check_streaming(
            &v2(0x21, 0x11, &V4_BLOCK),
            "28 192.168.0.1:56324 192.168.0.11:443",
        );
        check_streaming(
            &v2(0x21, 0x21, &v6_block()),
            "52 [2001:db8::1]:56324 [2001:db8::2]:443",
        );
        // UNSPEC with PROXY: accepted, addresses unknown.
        check_streaming(&v2(0x21, 0x00, &[]), "16 - -");
        // AF_UNIX: 216 bytes of paths, no socket addresses.
        check_streaming(&v2(0x21, 0x31, &[b'/'; 216]), "232 - -");
        // LOCAL ignores whatever block follows, even a datagram one.
        check_streaming(&v2(0x20, 0x00, &[]), "16 - - local");
        check_streaming(&v2(0x20, 0x11, &V4_BLOCK), "28 - - local");
        check_streaming(&v2(0x20, 0x12, &V4_BLOCK), "28 - - local");
    }

    #[test]
    fn v2_tlvs() {
        let mut payload = V4_BLOCK.to_vec();
        // PP2_TYPE_AUTHORITY "chat.signal.org", then PP2_TYPE_NOOP with 3 bytes.
        payload.extend_from_slice(&[0x02, 0, 15]);
        payload.extend_from_slice(b"chat.signal.org");
        payload.extend_from_slice(&[0x04, 0, 3, 0, 0, 0]);
        check_streaming(
            &v2(0x21, 0x11, &payload),
            "52 192.168.0.1:56324 192.168.0.11:443",
        );

        let mut truncated = V4_BLOCK.to_vec();
        truncated.extend_from_slice(&[0x02, 0, 15, b'c']);
        check(
            &v2(0x21, 0x11, &truncated),
            "error: malformed PROXY v2 header: truncated tlv",
        );
        let mut leftover = V4_BLOCK.to_vec();
        leftover.extend_from_slice(&[0x04, 0]);
        check(
            &v2(0x21, 0x11, &leftover),
            "error: malformed PROXY v2 header: truncated tlv",
        );
    }

    #[test]
    fn v2_rejects() {
        check(&V2_SIGNATURE[..5], "incomplete");
        check(
            b"\r\n\r\n\0\r\nQUIT\r",
            "error: not a PROXY protocol header",
        );
        check(b"\r\n\r\nGET", "error: not a PROXY protocol header");
        check(
            &v2(0x11, 0x11, &V4_BLOCK),
            "error: PROXY v2 header has unsupported version 1",
        );
        check(
            &v2(0x31, 0x11, &V4_BLOCK)[..16],
            "error: PROXY v2 header has unsupported version 3",
        );
        check(
            &v2(0x22, 0x11, &V4_BLOCK)[..16],
            "error: PROXY v2 header has unknown command 0x2",
        );
        check(
            &v2(0x21, 0x10, &V4_BLOCK)[..16],
            "error: PROXY v2 header has unknown address family and protocol 0x10",
        );
        check(
            &v2(0x21, 0x13, &V4_BLOCK)[..16],
            "error: PROXY v2 header has unknown address family and protocol 0x13",
        );
        check(
            &v2(0x21, 0x41, &V4_BLOCK)[..16],
            "error: PROXY v2 header has unknown address family and protocol 0x41",
        );
        check(
            &v2(0x21, 0x12, &V4_BLOCK),
            "error: PROXY v2 header describes a datagram connection, not a stream",
        );
        check(
            &v2(0x21, 0x11, &V4_BLOCK[..11]),
            "error: malformed PROXY v2 header: length too short for the address family",
        );
        check(
            &v2(0x21, 0x21, &V4_BLOCK),
            "error: malformed PROXY v2 header: length too short for the address family",
        );
    }

    #[test]
    fn v2_length_cap() {
        let mut max = V4_BLOCK.to_vec();
        max.extend_from_slice(&[0x04, 0x0f, 0xe1]);
        max.resize(MAX_HEADER_LEN - V2_FIXED_LEN, 0);
        check(
            &v2(0x21, 0x11, &max),
            "4096 192.168.0.1:56324 192.168.0.11:443",
        );
        // Refused from the fixed part alone, before the body arrives.
        let mut over = v2(0x21, 0x11, &max);
        over[15] += 1;
        check(&over[..16], "error: PROXY header longer than 4096 bytes");
        let mut huge = v2(0x21, 0x11, &[]);
        huge[14] = 0xff;
        huge[15] = 0xff;
        check(&huge, "error: PROXY header longer than 4096 bytes");
        assert_eq!(needed_hint(&v2(0x21, 0x11, &V4_BLOCK)[..16]), 12);
    }

    #[test]
    fn encode_v1() {
        check_encode(
            SendProxy::V1,
            Some("192.168.0.1:56324"),
            Some("192.168.0.11:443"),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            "47 192.168.0.1:56324 192.168.0.11:443",
        );
        check_encode(
            SendProxy::V1,
            Some("[2001:db8::1]:1"),
            Some("[::1]:65535"),
            b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n",
            "36 [2001:db8::1]:1 [::1]:65535",
        );
        // A dual-stack socket reports IPv4 clients as v4-mapped.
        check_encode(
            SendProxy::V1,
            Some("[::ffff:10.0.0.1]:5000"),
            Some("[::ffff:10.0.0.2]:443"),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 443\r\n",
            "39 10.0.0.1:5000 10.0.0.2:443",
        );
        check_encode(
            SendProxy::V1,
            Some("[::ffff:10.0.0.1]:5000"),
            Some("10.0.0.2:443"),
            b"PROXY TCP4 10.0.0.1 10.0.0.2 5000 443\r\n",
            "39 10.0.0.1:5000 10.0.0.2:443",
        );
        check_encode(
            SendProxy::V1,
            Some("10.0.0.1:5000"),
            Some("[2001:db8::2]:443"),
            b"PROXY UNKNOWN\r\n",
            "15 - -",
        );
        check_encode(
            SendProxy::V1,
            None,
            Some("10.0.0.2:443"),
            b"PROXY UNKNOWN\r\n",
            "15 - -",
        );
        check_encode(SendProxy::V1, None, None, b"PROXY UNKNOWN\r\n", "15 - -");
    }

    #[test]
    fn encode_v2() {
        let mut expect = V2_SIGNATURE.to_vec();
        expect.extend_from_slice(&[0x21, 0x11, 0, 12]);
        expect.extend_from_slice(&V4_BLOCK);
        check_encode(
            SendProxy::V2,
            Some("192.168.0.1:56324"),
            Some("192.168.0.11:443"),
            &expect,
            "28 192.168.0.1:56324 192.168.0.11:443",
        );
        check_encode(
            SendProxy::V2,
            Some("[2001:db8::1]:56324"),
            Some("[2001:db8::2]:443"),
            &v2(0x21, 0x21, &v6_block()),
            "52 [2001:db8::1]:56324 [2001:db8::2]:443",
        );
        check_encode(
            SendProxy::V2,
            Some("[::ffff:192.168.0.1]:56324"),
            Some("[::ffff:192.168.0.11]:443"),
            &expect,
            "28 192.168.0.1:56324 192.168.0.11:443",
        );
        let local = v2(0x20, 0x00, &[]);
        check_encode(SendProxy::V2, None, None, &local, "16 - - local");
        check_encode(
            SendProxy::V2,
            Some("10.0.0.1:1"),
            None,
            &local,
            "16 - - local",
        );
        check_encode(
            SendProxy::V2,
            Some("10.0.0.1:1"),
            Some("[2001:db8::2]:443"),
            &local,
            "16 - - local",
        );
        check_encode(
            SendProxy::None,
            Some("10.0.0.1:1"),
            Some("10.0.0.2:2"),
            b"",
            "",
        );
    }

    #[test]
    fn round_trip() {
        let cases = [
            ("1.2.3.4:5", "6.7.8.9:10"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            ("[fe80::1]:443", "[2001:db8:0:1:2:3:4:5]:8443"),
        ];
        for version in [SendProxy::V1, SendProxy::V2] {
            for (source, destination) in cases {
                let source: SocketAddr = source.parse().unwrap();
                let destination: SocketAddr = destination.parse().unwrap();
                let mut out = Vec::new();
                encode(version, Some(source), Some(destination), &mut out);
                let expect = Parsed::Complete {
                    len: out.len(),
                    header: ProxyHeader {
                        source: Some(source),
                        destination: Some(destination),
                        local: false,
                    },
                };
                assert_eq!(parse(&out), Ok(expect), "{version:?} {out:?}");
            }
        }
    }

    #[test]
    fn error_messages_hold_no_address() {
        let mut all = String::new();
        for input in [
            &b"PROXY TCP4 10.1.2.3 5.6.7.8 1 99999\r\n"[..],
            b"PROXY TCP4 10.1.2.3 ::1 1 2\r\n",
            b"PROXY TCP6 10.1.2.3 ::1 1 2\r\n",
        ] {
            let e = parse(input).unwrap_err();
            writeln!(all, "{e}").unwrap();
        }
        assert!(!all.contains("10.1.2.3") && !all.contains("::1"), "{all}");
        assert!(all.lines().all(|l| !l.ends_with('.')), "{all}");
    }
}
