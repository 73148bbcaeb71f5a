//! The server name (SNI) of a TLS ClientHello, read without terminating TLS, and the allowlist a
//! Signal relay checks it against.
//!
//! Signal-TLS-Proxy's inner tier reads the SNI of the ClientHello that arrives inside the outer
//! TLS tunnel and connects to that same name on :443, if it is one of [`SIGNAL_HOSTS`] (exact
//! match ignoring case); any other name, no SNI, or bytes that are not TLS close the connection.
//!
//! The parser is hand-written rather than `tls-parser`: it runs on every new connection, before
//! the upstream connect, so it is on the hot path of connection setup. It borrows the caller's
//! buffer, allocates nothing when the ClientHello fits one record (it always does in practice;
//! only a hello split over records is copied once), skips every extension but `server_name`
//! instead of decoding all of them into vectors as `tls-parser` does, and adds no `nom` to the
//! build. It is about 150 lines, checks every length against its container, and is tested on
//! real ClientHellos from rustls.
//!
//! Streaming: [`peek_sni`] takes every byte received so far. It says [`SniResult::Incomplete`]
//! while the ClientHello can still arrive whole (up to [`MAX_CLIENT_HELLO_LEN`]), and errs as
//! soon as the first bytes cannot start a TLS handshake record ([`SniError::NotTls`]).

use std::borrow::Cow;

use crate::config::preset::SIGNAL_HOSTS;

/// Largest ClientHello accepted (the handshake message, without record headers).
pub(crate) const MAX_CLIENT_HELLO_LEN: usize = 16 * 1024;

/// Largest TLS record (RFC 8446 section 5.1: a plaintext fragment is at most 2^14 bytes).
const MAX_RECORD_LEN: usize = 1 << 14;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
/// `pre_shared_key` (RFC 8446 section 4.2.11): the client offers a session to resume.
const EXTENSION_PRE_SHARED_KEY: u16 = 41;
const NAME_TYPE_HOST_NAME: u8 = 0x00;
/// Longest DNS name.
const MAX_NAME_LEN: usize = 253;

/// What [`peek_sni`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniResult {
    /// The `host_name` the client asked for, lowercased.
    Found(String),
    /// A complete ClientHello without a `server_name` extension.
    NoSni,
    /// The ClientHello has not fully arrived; read more and call again with all of it.
    Incomplete,
}

/// Why the bytes are not a ClientHello this relay can route. Always the client's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a tls handshake")]
    NotTls,
    #[error("first tls handshake message is not a ClientHello")]
    NotClientHello,
    #[error("ClientHello longer than {MAX_CLIENT_HELLO_LEN} bytes")]
    TooLarge,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("server name is not a valid host name")]
    BadName,
}

/// Reads the SNI of the ClientHello at the start of `buf`, which holds every byte received so far.
/// The bytes are not consumed: the caller relays all of them to the upstream.
pub fn peek_sni(buf: &[u8]) -> Result<SniResult, SniError> {
    match client_hello(buf)? {
        None => Ok(SniResult::Incomplete),
        Some(hello) => parse_client_hello(&hello),
    }
}

/// What a TLS server imitating OpenSSL needs of a ClientHello that rustls does not tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HelloFacts {
    /// `legacy_version`: below 0x0303 the client can speak only TLS 1.1 or older.
    pub legacy_version: u16,
    /// It offers a session to resume (`pre_shared_key`, a TLS 1.3 ticket).
    pub offers_psk: bool,
    /// It offers an ECDHE cipher suite (0xC0xx, or ChaCha20's 0xCCA8/0xCCA9).
    pub offers_ecdhe: bool,
}

/// [`HelloFacts`] of the complete ClientHello at the start of `buf`; `None` while incomplete or
/// if malformed.
pub(crate) fn hello_facts(buf: &[u8]) -> Option<HelloFacts> {
    let hello = client_hello(buf).ok()??;
    let legacy_version = u16::from_be_bytes([*hello.first()?, *hello.get(1)?]);
    let mut r = Reader(&hello);
    r.take(2 + 32, "").ok()?;
    let session_id = r.u8().ok()?;
    r.take(usize::from(session_id), "").ok()?;
    let suites = r.u16().ok()?;
    let offers_ecdhe = r
        .take(usize::from(suites), "")
        .ok()?
        .chunks_exact(2)
        .any(|c| c[0] == 0xc0 || (c[0] == 0xcc && matches!(c[1], 0xa8 | 0xa9)));
    let mut offers_psk = false;
    for_each_extension(&hello, |kind, _| {
        offers_psk |= kind == EXTENSION_PRE_SHARED_KEY;
        Ok(())
    })
    .ok()?;
    Some(HelloFacts {
        legacy_version,
        offers_psk,
        offers_ecdhe,
    })
}

/// The body of the ClientHello at the start of `buf` (after its 4-byte handshake header),
/// gathered from as many records as it spans; `None` while incomplete.
fn client_hello(buf: &[u8]) -> Result<Option<Cow<'_, [u8]>>, SniError> {
    let mut rest = buf;
    // The handshake message, gathered from as many records as it spans.
    let mut message: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    loop {
        check_record_start(rest)?;
        if rest.len() < RECORD_HEADER_LEN {
            return Ok(None);
        }
        let record_len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if record_len == 0 {
            return Err(SniError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(SniError::Malformed("record longer than 16384 bytes"));
        }
        let body = &rest[RECORD_HEADER_LEN..];
        let fragment = &body[..record_len.min(body.len())];
        if message.is_empty() {
            message = Cow::Borrowed(fragment);
        } else {
            message.to_mut().extend_from_slice(fragment);
        }

        if message
            .first()
            .is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO)
        {
            return Err(SniError::NotClientHello);
        }
        if let Some(header) = message.get(..HANDSHAKE_HEADER_LEN) {
            let hello_len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if hello_len > MAX_CLIENT_HELLO_LEN {
                return Err(SniError::TooLarge);
            }
            if message.len() >= HANDSHAKE_HEADER_LEN + hello_len {
                return Ok(Some(match message {
                    Cow::Borrowed(m) => {
                        Cow::Borrowed(&m[HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + hello_len])
                    }
                    Cow::Owned(m) => Cow::Owned(
                        m[HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + hello_len].to_vec(),
                    ),
                }));
            }
        }
        if fragment.len() < record_len {
            return Ok(None);
        }
        rest = &body[record_len..];
    }
}

/// Errs unless the bytes (as many as there are, up to 3) can start a TLS handshake record:
/// content type 22, protocol version 3.0 to 3.4.
fn check_record_start(record: &[u8]) -> Result<(), SniError> {
    match *record {
        [t, ..] if t != CONTENT_TYPE_HANDSHAKE => Err(SniError::NotTls),
        [_, major, ..] if major != 3 => Err(SniError::NotTls),
        [_, _, minor, ..] if minor > 4 => Err(SniError::NotTls),
        _ => Ok(()),
    }
}

/// Parses a complete ClientHello body (after the 4-byte handshake header).
fn parse_client_hello(hello: &[u8]) -> Result<SniResult, SniError> {
    let mut found = None;
    for_each_extension(hello, |kind, data| {
        if kind == EXTENSION_SERVER_NAME {
            if found.is_some() {
                return Err(SniError::Malformed("two server_name extensions"));
            }
            found = Some(parse_server_name(data)?);
        }
        Ok(())
    })?;
    Ok(found.flatten().map_or(SniResult::NoSni, SniResult::Found))
}

/// Calls `f` with each extension (type, data) of a complete ClientHello body.
fn for_each_extension(
    hello: &[u8],
    mut f: impl FnMut(u16, &[u8]) -> Result<(), SniError>,
) -> Result<(), SniError> {
    let mut r = Reader(hello);
    r.take(2 + 32, "truncated version or random")?;
    let session_id = r.u8()?;
    if session_id > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    r.take(usize::from(session_id), "truncated session id")?;
    let suites = r.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err(SniError::Malformed("bad cipher suite list length"));
    }
    r.take(usize::from(suites), "truncated cipher suites")?;
    let compressions = r.u8()?;
    if compressions < 1 {
        return Err(SniError::Malformed("empty compression method list"));
    }
    r.take(usize::from(compressions), "truncated compression methods")?;
    if r.0.is_empty() {
        // A TLS 1.2 hello may have no extensions at all.
        return Ok(());
    }
    let extensions_len = r.u16()?;
    let mut extensions = Reader(r.take(usize::from(extensions_len), "truncated extensions")?);
    if !r.0.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = extensions.u16()?;
        f(
            kind,
            extensions.take(usize::from(len), "truncated extension")?,
        )?;
    }
    Ok(())
}

/// Parses the `server_name` extension (RFC 6066 section 3): the first `host_name`, lowercased.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader(data);
    let list_len = r.u16()?;
    if usize::from(list_len) != r.0.len() || list_len == 0 {
        return Err(SniError::Malformed("bad server name list length"));
    }
    let mut host_name = None;
    while !r.0.is_empty() {
        let kind = r.u8()?;
        let len = r.u16()?;
        let name = r.take(usize::from(len), "truncated server name")?;
        if kind == NAME_TYPE_HOST_NAME {
            if host_name.is_some() {
                return Err(SniError::Malformed("two host names"));
            }
            host_name = Some(valid_host_name(name)?);
        }
    }
    Ok(host_name)
}

/// A host name as RFC 6066 allows it: ASCII letters, digits, `-`, `_` and `.`, not empty, at
/// most 253 bytes; returned lowercased.
fn valid_host_name(name: &[u8]) -> Result<String, SniError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(SniError::BadName);
    }
    Ok(name
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// A cursor over a complete structure: running out of bytes means it is malformed.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(self.take(1, "truncated field")?[0])
    }

    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2, "truncated field")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Server names a relay lets through: exact match, ASCII case ignored.
///
/// A linear scan: allowlists are short (13 names for Signal), and a scan allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniAllowlist {
    names: Vec<String>,
}

impl SniAllowlist {
    /// An allowlist of `names` (stored lowercased).
    pub fn new<I, S>(names: I) -> SniAllowlist
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        SniAllowlist {
            names: names
                .into_iter()
                .map(|n| n.as_ref().to_ascii_lowercase())
                .collect(),
        }
    }

    /// The Signal-TLS-Proxy allowlist, [`SIGNAL_HOSTS`].
    pub fn signal() -> SniAllowlist {
        SniAllowlist::new(SIGNAL_HOSTS)
    }

    /// Whether `name` is on the list, ignoring ASCII case.
    pub fn allows(&self, name: &str) -> bool {
        self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// The names, lowercased.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;

    /// Renders what [`peek_sni`] says about `input` and compares it with `expect`:
    /// `found <name>`, `no sni`, `incomplete` or `error: <message>`.
    #[track_caller]
    fn check(input: &[u8], expect: &str) {
        let actual = match peek_sni(input) {
            Ok(SniResult::Found(name)) => format!("found {name}"),
            Ok(SniResult::NoSni) => "no sni".to_owned(),
            Ok(SniResult::Incomplete) => "incomplete".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        assert_eq!(actual, expect, "{} bytes", input.len());
    }

    /// Every strict prefix of `hello` is incomplete; `hello` followed by more records gives
    /// `expect`.
    #[track_caller]
    fn check_streaming(hello: &[u8], expect: &str) {
        for cut in 0..hello.len() {
            check(&hello[..cut], "incomplete");
        }
        check(hello, expect);
        let mut more = hello.to_vec();
        more.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03, 0x03]);
        check(&more, expect);
    }

    /// The first flight of a rustls client connecting to `name`.
    fn rustls_hello(name: &str, tweak: impl FnOnce(&mut ClientConfig)) -> Vec<u8> {
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        tweak(&mut config);
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut client = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        client.write_tls(&mut out).unwrap();
        out
    }

    /// Re-frames the handshake messages of `records` into records of at most `size` bytes.
    fn reframe(records: &[u8], size: usize) -> Vec<u8> {
        let mut message = Vec::new();
        let mut rest = records;
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            message.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
        }
        let mut out = Vec::new();
        for piece in message.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
            out.extend_from_slice(piece);
        }
        out
    }

    /// A ClientHello record with these extension bytes (`None`: no extensions block).
    fn hello(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0xab; 32]);
        body.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        if let Some(extensions) = extensions {
            body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
            body.extend_from_slice(extensions);
        }
        let mut handshake = vec![0x01, 0x00];
        handshake.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    /// A `server_name` extension holding these (type, name) entries.
    fn server_name(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (kind, name) in entries {
            list.push(*kind);
            list.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&u16::try_from(list.len() + 2).unwrap().to_be_bytes());
        ext.extend_from_slice(&u16::try_from(list.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    #[test]
    fn rustls_client_hellos() {
        check_streaming(
            &rustls_hello("chat.signal.org", |_| {}),
            "found chat.signal.org",
        );
        check_streaming(
            &rustls_hello("Storage.Signal.ORG", |_| {}),
            "found storage.signal.org",
        );
        // No SNI for an IP address, nor when the client turns it off.
        check_streaming(&rustls_hello("192.0.2.1", |_| {}), "no sni");
        check_streaming(
            &rustls_hello("cdn.signal.org", |c| c.enable_sni = false),
            "no sni",
        );
    }

    #[test]
    fn client_hello_over_several_records() {
        let whole = rustls_hello("cdsi.signal.org", |_| {});
        for size in [1, 2, 3, 4, 5, 100, 511] {
            check_streaming(&reframe(&whole, size), "found cdsi.signal.org");
        }
    }

    #[test]
    fn client_hello_larger_than_one_read() {
        // About 10 KiB of ALPN names: one record, many reads.
        let big = rustls_hello("svr2.signal.org", |c| {
            c.alpn_protocols = (0..50u8).map(|i| vec![b'a' + i % 26; 200]).collect();
        });
        assert!(
            big.len() > 10_000 && big.len() < 5 + MAX_RECORD_LEN,
            "{}",
            big.len()
        );
        check_streaming(&big, "found svr2.signal.org");
        // Over 16 KiB: refused as soon as the handshake header says so.
        let huge = rustls_hello("svr2.signal.org", |c| {
            c.alpn_protocols = (0..100u8).map(|i| vec![b'a' + i % 26; 200]).collect();
        });
        check(&huge[..9], "error: ClientHello longer than 16384 bytes");
        check(&huge, "error: ClientHello longer than 16384 bytes");
    }

    #[test]
    fn not_tls() {
        check(b"GET / HTTP/1.1\r\n", "error: not a tls handshake");
        check(b"PROXY TCP4 ", "error: not a tls handshake");
        // An SSLv2-compatible hello.
        check(
            &[0x80, 0x2e, 0x01, 0x03, 0x01],
            "error: not a tls handshake",
        );
        check(&[0x17], "error: not a tls handshake");
        check(&[0x16, 0x02], "error: not a tls handshake");
        check(&[0x16, 0x03, 0x05], "error: not a tls handshake");
        check(&[0x16], "incomplete");
        check(&[0x16, 0x03, 0x01, 0x00], "incomplete");
        check(
            &[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00],
            "error: first tls handshake message is not a ClientHello",
        );
        check(
            &[0x16, 0x03, 0x01, 0x00, 0x04, 0x02],
            "error: first tls handshake message is not a ClientHello",
        );
        check(
            &[0x16, 0x03, 0x01, 0x00, 0x00],
            "error: malformed ClientHello: empty handshake record",
        );
        check(
            &[0x16, 0x03, 0x01, 0x40, 0x01, 0x01],
            "error: malformed ClientHello: record longer than 16384 bytes",
        );
        // The second record of a split hello must be a handshake record too.
        let split = reframe(&hello(None), 10);
        let mut bad = split[..15].to_vec();
        bad.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        check(&bad, "error: not a tls handshake");
    }

    #[test]
    fn hand_made_client_hellos() {
        check_streaming(&hello(None), "no sni");
        check_streaming(&hello(Some(&[])), "no sni");
        // Another extension, then server_name.
        let mut ext = vec![0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04];
        ext.extend_from_slice(&server_name(&[(0, b"updates2.signal.org")]));
        check_streaming(&hello(Some(&ext)), "found updates2.signal.org");
        // An unknown name type is skipped.
        check(
            &hello(Some(&server_name(&[
                (7, b"x"),
                (0, b"sfu.voip.signal.org"),
            ]))),
            "found sfu.voip.signal.org",
        );
        check(&hello(Some(&server_name(&[(7, b"x")]))), "no sni");
        check(
            &hello(Some(&server_name(&[(0, b"a.example"), (0, b"b.example")]))),
            "error: malformed ClientHello: two host names",
        );
        let two = [
            server_name(&[(0, b"a.example")]),
            server_name(&[(0, b"b.example")]),
        ]
        .concat();
        check(
            &hello(Some(&two)),
            "error: malformed ClientHello: two server_name extensions",
        );
        for bad in [&b""[..], b"a b", b"caf\xc3\xa9.example", b"a\0", b"a/b"] {
            check(
                &hello(Some(&server_name(&[(0, bad)]))),
                "error: server name is not a valid host name",
            );
        }
        check(
            &hello(Some(&server_name(&[(0, &[b'a'; 254])]))),
            "error: server name is not a valid host name",
        );
        check(
            &hello(Some(&[0x00, 0x00, 0x00, 0x02, 0x00, 0x00])),
            "error: malformed ClientHello: bad server name list length",
        );
        check(
            &hello(Some(&[
                0x00, 0x00, 0x00, 0x05, 0x00, 0x03, 0x00, 0x00, 0x09,
            ])),
            "error: malformed ClientHello: truncated server name",
        );
        check(
            &hello(Some(&[0x00, 0x00, 0x00, 0x09, 0x00])),
            "error: malformed ClientHello: truncated extension",
        );
        check(
            &hello(Some(&[0x00, 0x00, 0x00])),
            "error: malformed ClientHello: truncated field",
        );
    }

    #[test]
    fn malformed_fixed_fields() {
        // Corrupt one length field of a valid hello at a time; the record stays complete.
        let valid = hello(Some(&server_name(&[(0, b"chat.signal.org")])));
        let corrupt = |at: usize, value: u8| {
            let mut h = valid.clone();
            h[at] = value;
            h
        };
        // Offsets: 5 record header, 4 handshake header, 2 version, 32 random, then session id.
        let sid = 5 + 4 + 2 + 32;
        check(
            &corrupt(sid, 33),
            "error: malformed ClientHello: session id longer than 32 bytes",
        );
        check(
            &corrupt(sid, 32),
            "error: malformed ClientHello: truncated field",
        );
        check(
            &corrupt(sid + 2, 3),
            "error: malformed ClientHello: bad cipher suite list length",
        );
        check(
            &corrupt(sid + 2, 0),
            "error: malformed ClientHello: bad cipher suite list length",
        );
        check(
            &corrupt(sid + 2, 0x40),
            "error: malformed ClientHello: truncated cipher suites",
        );
        check(
            &corrupt(sid + 5, 0),
            "error: malformed ClientHello: empty compression method list",
        );
        check(
            &corrupt(sid + 5, 0xff),
            "error: malformed ClientHello: truncated compression methods",
        );
        check(
            &corrupt(sid + 8, 0xff),
            "error: malformed ClientHello: truncated extensions",
        );
        check(
            &corrupt(sid + 8, 0x00),
            "error: malformed ClientHello: bytes after the extensions",
        );
        // A handshake length that ends inside the random.
        let mut short = valid.clone();
        short[5 + 3] = 10;
        check(
            &short,
            "error: malformed ClientHello: truncated version or random",
        );
    }

    #[test]
    fn allowlist() {
        let signal = SniAllowlist::signal();
        assert_eq!(signal.names().count(), 13);
        for name in SIGNAL_HOSTS {
            assert!(signal.allows(name), "{name}");
            assert!(signal.allows(&name.to_ascii_uppercase()), "{name}");
        }
        for name in [
            "signal.org",
            "evil.chat.signal.org",
            "chat.signal.org.",
            "chat.signal.or",
            "",
        ] {
            assert!(!signal.allows(name), "{name}");
        }
        let custom = SniAllowlist::new(["Example.NET"]);
        assert!(custom.allows("example.net") && custom.allows("EXAMPLE.net"));
        assert_eq!(custom.names().collect::<Vec<_>>(), ["example.net"]);
        assert!(!SniAllowlist::new(Vec::<String>::new()).allows("example.net"));
        // What peek_sni returns is what allows() takes.
        let Ok(SniResult::Found(name)) = peek_sni(&rustls_hello("GRPC.chat.signal.org", |_| {}))
        else {
            panic!("no sni")
        };
        assert!(signal.allows(&name));
    }
}
