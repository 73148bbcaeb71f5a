//! The supervisor-to-worker wire: [`ControlMsg`], the messages the supervisor writes down each
//! worker's control pipe (the worker's stdin) and the worker applies
//! ([`crate::engine::WorkerCtx::apply_control`]).
//!
//! Framing: one message per line, each line one JSON object (serde_json, compact) followed by
//! `\n`. JSON escapes a newline inside a string, so PEM and TOML text travel as they are and a
//! line never holds more than one message. A line that is not valid UTF-8, not JSON, not a known
//! message, or whose fields do not check (an address, a CIDR with host bits set, ticket keys of
//! the wrong length) decodes to None: the worker logs it and reads on.
//!
//! Both ends are the same binary (a worker is the supervisor re-executed), so the format needs no
//! version: it only has to be unambiguous and refuse garbage.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::proto::tls::{AcmeChallenge, TicketKeys};

/// Messages from the supervisor to a worker, one per line on the worker's stdin ([`ControlMsg::encode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlMsg {
    /// The full, ordered address list of upstream entry `entry` of listener `listener` (may be
    /// empty).
    Addrs {
        listener: usize,
        entry: usize,
        addrs: Vec<SocketAddr>,
    },
    /// Stop accepting; exit once the open connections have closed.
    Drain,
    /// The certificate chain and key of TLS listener `listener` (PEM).
    Tls {
        listener: usize,
        chain_pem: String,
        key_pem: String,
    },
    /// The session-ticket keys every TLS listener with `session_tickets` encrypts and decrypts
    /// tickets with (the same in every worker; sent at start and at each rotation).
    TicketKeys(#[serde(with = "ticket_keys")] TicketKeys),
    /// End of the start-up messages: the worker may start accepting.
    Ready,
    /// The admission lists, whole ([`crate::admission`]); `generation` grows with each change
    /// and the worker reports it back in its counter row once applied.
    Admission {
        generation: u64,
        allow: Vec<Cidr>,
        deny: Vec<Cidr>,
        dests: Vec<SocketAddr>,
    },
    /// A reload: the whole new configuration as TOML. It has the
    /// same listeners in the same order; the address lists, certificates and admission lists
    /// that go with it follow in the next lines.
    Config { toml: String },
    /// The sockmap verdict started holding bytes of socket `cookie` (flow control; relayed by
    /// the supervisor when it reads the event ring of maps shared through pins).
    Held { cookie: u64, kind: u32 },
    /// Where listener `listener`'s decoy is (the built-in site, or its `HOST:PORT` resolved);
    /// None: off, or the name does not resolve (then such connections are closed).
    /// `https_addr`: where plaintext sent to a TLS listener goes instead (the local site's twin
    /// that answers nginx's "plain HTTP request was sent to HTTPS port"); None: to `addr`.
    Decoy {
        listener: usize,
        addr: Option<SocketAddr>,
        https_addr: Option<SocketAddr>,
    },
    /// The TLS-ALPN-01 challenges listener `listener` answers now, whole (empty: none);
    /// [`crate::proto::tls::TlsServer::with_challenges`].
    Challenges {
        listener: usize,
        challenges: Vec<AcmeChallenge>,
    },
    /// Close every live connection whose client (its peer address now) is in one of `cidrs`
    /// (`sluicectl deny add --kill-existing`), then report `generation`.
    Kill { generation: u64, cidrs: Vec<Cidr> },
}

impl ControlMsg {
    /// The message as one line: a JSON object and `\n`.
    pub fn encode(&self) -> String {
        let mut line = serde_json::to_string(self)
            .expect("a control message has no map with non-string keys and always serializes");
        line.push('\n');
        line
    }

    /// One line (with or without its `\n`) back into a message; None for anything else.
    pub fn decode(line: impl AsRef<[u8]>) -> Option<ControlMsg> {
        let line = line.as_ref();
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        // One message a line: the framing never puts a newline inside one.
        if line.contains(&b'\n') {
            return None;
        }
        serde_json::from_slice(line).ok()
    }
}

/// [`TicketKeys`] on the wire: their one-word text form ([`TicketKeys::to_hex`]), checked on the
/// way in ([`TicketKeys::from_hex`]).
mod ticket_keys {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::proto::tls::TicketKeys;

    pub(crate) fn serialize<S: Serializer>(keys: &TicketKeys, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&keys.to_hex())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TicketKeys, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        TicketKeys::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom("malformed session-ticket keys"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `msg`, checks the framing (one line, `\n` last), decodes it back.
    fn check(msg: ControlMsg) {
        let line = msg.encode();
        assert!(line.ends_with('\n'), "{line:?}");
        assert_eq!(line.matches('\n').count(), 1, "one line: {line:?}");
        assert_eq!(ControlMsg::decode(&line), Some(msg.clone()), "{line:?}");
        assert_eq!(
            ControlMsg::decode(line.trim_end_matches('\n')),
            Some(msg),
            "without its newline"
        );
    }

    fn pem() -> String {
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()
    }

    fn challenge(domain: &str) -> AcmeChallenge {
        AcmeChallenge {
            domain: domain.into(),
            cert_pem: pem(),
            key_pem: "k\n".into(),
        }
    }

    #[test]
    fn addrs_round_trip() {
        check(ControlMsg::Addrs {
            listener: 3,
            entry: 1,
            addrs: vec![],
        });
        check(ControlMsg::Addrs {
            listener: 0,
            entry: 0,
            addrs: vec![
                "127.0.0.1:80".parse().unwrap(),
                "[::1]:443".parse().unwrap(),
            ],
        });
    }

    #[test]
    fn drain_and_ready_round_trip() {
        check(ControlMsg::Drain);
        check(ControlMsg::Ready);
    }

    #[test]
    fn tls_round_trips() {
        check(ControlMsg::Tls {
            listener: 2,
            chain_pem: pem(),
            key_pem: "k \"quoted\" \\ \u{e9}\n".into(),
        });
    }

    #[test]
    fn ticket_keys_round_trip() {
        let keys = TicketKeys::generate(crate::proto::tls::TICKET_ROTATE).unwrap();
        check(ControlMsg::TicketKeys(keys.clone()));
        check(ControlMsg::TicketKeys(keys.rotate().unwrap()));
    }

    #[test]
    fn admission_round_trips() {
        check(ControlMsg::Admission {
            generation: 7,
            allow: vec!["10.0.0.0/8".parse().unwrap()],
            deny: vec![
                "127.0.0.3/32".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            dests: vec![],
        });
        check(ControlMsg::Admission {
            generation: 0,
            allow: vec![],
            deny: vec![],
            dests: vec!["[::1]:443".parse().unwrap()],
        });
    }

    #[test]
    fn config_round_trips() {
        check(ControlMsg::Config {
            toml: "[[listen]]\nname = \"a b\"\n".into(),
        });
        check(ControlMsg::Config {
            toml: String::new(),
        });
    }

    #[test]
    fn held_round_trips() {
        check(ControlMsg::Held {
            cookie: u64::MAX,
            kind: 1,
        });
    }

    #[test]
    fn decoy_round_trips() {
        check(ControlMsg::Decoy {
            listener: 3,
            addr: Some("127.0.0.1:4321".parse().unwrap()),
            https_addr: Some("[::1]:4322".parse().unwrap()),
        });
        check(ControlMsg::Decoy {
            listener: 0,
            addr: None,
            https_addr: None,
        });
    }

    #[test]
    fn challenges_round_trip() {
        check(ControlMsg::Challenges {
            listener: 1,
            challenges: Vec::new(),
        });
        check(ControlMsg::Challenges {
            listener: 0,
            challenges: vec![challenge("a.example"), challenge("b.example")],
        });
    }

    #[test]
    fn kill_round_trips() {
        check(ControlMsg::Kill {
            generation: 9,
            cidrs: vec!["127.0.0.3/32".parse().unwrap(), "::1/128".parse().unwrap()],
        });
        check(ControlMsg::Kill {
            generation: 0,
            cidrs: vec![],
        });
    }

    #[test]
    fn garbage_is_refused() {
        for line in [
            &b""[..],
            b"\n",
            b"drain\n",
            b"\"bogus\"\n",
            b"{}\n",
            b"[]\n",
            b"null\n",
            b"\xff\xfe\n",
            b"\"drain\" \"ready\"\n",
            b"\"drain\"\n\"ready\"\n",
            b"{\"held\":{\"cookie\":1}}\n",
            b"{\"held\":{\"cookie\":1,\"kind\":2,\"extra\":3}}\n",
            b"{\"held\":{\"cookie\":-1,\"kind\":2}}\n",
            b"{\"held\":{\"cookie\":1,\"kind\":4294967296}}\n",
            b"{\"addrs\":{\"listener\":\"x\",\"entry\":0,\"addrs\":[]}}\n",
            b"{\"addrs\":{\"listener\":0,\"entry\":0,\"addrs\":[\"1.2.3.4\"]}}\n",
            b"{\"ticket_keys\":\"00ff\"}\n",
            b"{\"ticket_keys\":\"60:00\"}\n",
            b"{\"kill\":{\"generation\":1,\"cidrs\":[\"nonsense\"]}}\n",
            // A range written with host bits set is refused, as in the config.
            b"{\"kill\":{\"generation\":1,\"cidrs\":[\"10.1.2.3/8\"]}}\n",
            b"{\"challenges\":{\"listener\":0,\"challenges\":[{\"domain\":\"a\"}]}}\n",
            b"{\"config\":{\"toml\":1}}\n",
            b"{\"drain\":null,\"ready\":null}\n",
        ] {
            assert_eq!(
                ControlMsg::decode(line),
                None,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        // A truncated line of every kind.
        let keys = TicketKeys::generate(crate::proto::tls::TICKET_ROTATE).unwrap();
        let line = ControlMsg::TicketKeys(keys).encode();
        for cut in 0..line.len() - 2 {
            assert_eq!(ControlMsg::decode(&line[..cut]), None, "{cut}");
        }
    }

    #[test]
    fn committed_fuzz_seeds_of_the_wire_decode() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/control");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let line = std::fs::read(entry.unwrap().path()).unwrap();
            // The others are control-socket commands (`deny add ...`).
            if line.starts_with(b"{") || line.starts_with(b"\"") {
                let msg = ControlMsg::decode(&line)
                    .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&line)));
                assert_eq!(ControlMsg::decode(msg.encode()), Some(msg));
                seen += 1;
            }
        }
        assert!(seen >= 10, "{seen}");
    }
}
