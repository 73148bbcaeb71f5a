//! `sluicectl share`: the links users tap to use this relay, and their QR codes.
//!
//! WhatsApp's form is `https://wa.me/proxy?host=HOST&chatPort=443&mediaPort=587&chatTLS=1`,
//! Signal's is `https://signal.tube/#HOST`. Which links a configuration gets, and the ports in
//! them, come from its listeners (see [`links`]): nothing here is hard-wired to the presets'
//! numbers, so a changed configuration prints what it really serves. No network is used.

use std::net::IpAddr;

use qrcode::QrCode;
use qrcode::render::unicode::Dense1x2;

use crate::config::{Config, Listener, Route, validate_host};

/// One link to share, and the messenger it is for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    /// `whatsapp` or `signal`.
    pub messenger: &'static str,
    pub url: String,
}

/// Ports the operator publishes under other numbers (a load balancer in front, e.g. 443 → 8443).
#[derive(Debug, Clone, Copy, Default)]
pub struct PortOverrides {
    pub chat_port: Option<u16>,
    pub media_port: Option<u16>,
}

/// The host as it goes into a link: names lowercased (without a trailing dot).
fn normalize(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
    }
}

/// Does this listener serve WhatsApp? (an upstream named `whatsapp.net` or a subdomain of it)
fn to_whatsapp(l: &Listener, port: u16) -> bool {
    l.route == Route::Static
        && l.upstream.iter().any(|u| {
            u.port == port && (u.host == "whatsapp.net" || u.host.ends_with(".whatsapp.net"))
        })
}

/// Listeners a phone connects to directly (those expecting a PROXY header are for a load
/// balancer in front, not for users).
fn direct(config: &Config) -> impl Iterator<Item = &Listener> {
    config.listeners.iter().filter(|l| !l.accept_proxy)
}

/// With no direct listener, one behind a load balancer (`accept_proxy`, e.g. the Helm chart's):
/// chat prefers TLS, media is plain.
fn behind_balancer(config: &Config, upstream_port: u16) -> Option<&Listener> {
    let mut found = config
        .listeners
        .iter()
        .filter(|l| l.accept_proxy && to_whatsapp(l, upstream_port));
    if upstream_port == 443 {
        found.find(|l| l.tls.is_none())
    } else {
        found.min_by_key(|l| l.tls.is_none())
    }
}

/// The links for `config` reached at `host`:
/// - WhatsApp when a direct listener relays to WhatsApp chat (`*.whatsapp.net:5222`; the first
///   TLS one, else the first plain one, gives `chatPort` and `chatTLS`) and one relays media
///   (`whatsapp.net:443`, the first gives `mediaPort`);
/// - Signal when a direct TLS listener on port 443 routes by SNI (signal.tube links carry no
///   port, so Signal always connects to 443).
///
/// Errors when the configuration serves neither, or serves WhatsApp chat without media.
pub fn links(config: &Config, host: &str, ports: PortOverrides) -> Result<Vec<Link>, String> {
    validate_host(host)?;
    let host = normalize(host);
    let mut out = Vec::new();
    let chat = direct(config)
        .filter(|l| to_whatsapp(l, 5222))
        .min_by_key(|l| l.tls.is_none())
        .or_else(|| behind_balancer(config, 5222));
    let media = direct(config)
        .find(|l| l.tls.is_none() && to_whatsapp(l, 443))
        .or_else(|| behind_balancer(config, 443));
    match (chat, media) {
        (Some(chat), Some(media)) => {
            let port = |l: &Listener, given: Option<u16>, what: &str| match given {
                Some(p) => Ok(p),
                None if l.accept_proxy => Err(format!(
                    "listener `{}` expects a PROXY header from a load balancer, which publishes \
                     it under its own port: pass --{what}-port with that port",
                    l.name
                )),
                None => Ok(l.bind.port()),
            };
            let chat_port = port(chat, ports.chat_port, "chat")?;
            let media_port = port(media, ports.media_port, "media")?;
            let tls = u8::from(chat.tls.is_some());
            out.push(Link {
                messenger: "whatsapp",
                url: format!(
                    "https://wa.me/proxy?host={host}&chatPort={chat_port}&mediaPort={media_port}&chatTLS={tls}"
                ),
            });
        }
        (Some(_), None) => {
            return Err(
                "the configuration relays WhatsApp chat but no listener relays media \
                 (upstream whatsapp.net:443): WhatsApp's link needs both"
                    .into(),
            );
        }
        _ => {}
    }
    if let Some(l) = direct(config).find(|l| l.route == Route::Sni && l.tls.is_some()) {
        if l.bind.port() != 443 && ports.chat_port != Some(443) {
            return Err(format!(
                "listener `{}` serves Signal on port {}, but Signal's links always use 443: \
                 bind it to 443 or publish it as 443 (then pass --chat-port 443)",
                l.name,
                l.bind.port()
            ));
        }
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        out.push(Link {
            messenger: "signal",
            url: format!("https://signal.tube/#{host}"),
        });
    }
    if out.is_empty() {
        return Err(
            "no listener serves WhatsApp (upstream *.whatsapp.net) or Signal \
             (TLS with route = \"sni\"): there is no link to share"
                .into(),
        );
    }
    Ok(out)
}

/// `url` as a QR code drawn with Unicode half blocks (two rows a line), dark on light with a
/// quiet zone, so a phone's camera reads it from a terminal of either colour scheme.
pub fn qr_text(url: &str) -> Result<String, String> {
    let code = QrCode::new(url.as_bytes()).map_err(|e| format!("cannot encode a QR code: {e}"))?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Dark)
        .light_color(Dense1x2::Light)
        .quiet_zone(true)
        .build())
}

/// Pixels per QR module in the PNG.
const PNG_SCALE: usize = 8;
/// Quiet zone around the code, in modules (the standard asks for 4).
const PNG_QUIET: usize = 4;

/// `url` as a QR code in a greyscale PNG (8 pixels a module, 4 modules of quiet zone).
pub fn qr_png(url: &str) -> Result<Vec<u8>, String> {
    let code = QrCode::new(url.as_bytes()).map_err(|e| format!("cannot encode a QR code: {e}"))?;
    let width = code.width();
    let colors = code.to_colors();
    let side = (width + 2 * PNG_QUIET) * PNG_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c != qrcode::Color::Dark {
            continue;
        }
        let (mx, my) = (i % width + PNG_QUIET, i / width + PNG_QUIET);
        for dy in 0..PNG_SCALE {
            let row = (my * PNG_SCALE + dy) * side;
            let start = row + mx * PNG_SCALE;
            pixels[start..start + PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    let side32 = u32::try_from(side).map_err(|_| "QR code too large".to_string())?;
    let mut enc = png::Encoder::new(&mut out, side32, side32);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| format!("cannot write PNG: {e}"))?;
    w.write_image_data(&pixels)
        .map_err(|e| format!("cannot write PNG: {e}"))?;
    w.finish().map_err(|e| format!("cannot write PNG: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset::Preset;

    #[test]
    fn whatsapp_preset_gives_the_official_link_form() {
        let l = links(
            &Preset::Whatsapp.config(),
            "Proxy.Example.org",
            PortOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            l,
            [Link {
                messenger: "whatsapp",
                url: "https://wa.me/proxy?host=proxy.example.org&chatPort=443&mediaPort=587&chatTLS=1"
                    .into()
            }]
        );
    }

    #[test]
    fn signal_preset_gives_a_signal_tube_link() {
        let l = links(
            &Preset::Signal.config(),
            "203.0.113.7",
            PortOverrides::default(),
        )
        .unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].url, "https://signal.tube/#203.0.113.7");
    }

    #[test]
    fn ports_follow_the_listeners() {
        let mut c = Preset::Whatsapp.config();
        // Without the TLS listeners, chat goes to the first plain chat port and chatTLS is 0.
        c.listeners
            .retain(|l| l.tls.is_none() && l.bind.port() != 587);
        let l = links(&c, "192.0.2.1", PortOverrides::default()).unwrap();
        assert_eq!(
            l[0].url,
            "https://wa.me/proxy?host=192.0.2.1&chatPort=5222&mediaPort=7777&chatTLS=0"
        );
        let l = links(
            &c,
            "192.0.2.1",
            PortOverrides {
                chat_port: Some(443),
                media_port: Some(587),
            },
        )
        .unwrap();
        assert!(l[0].url.contains("chatPort=443&mediaPort=587"), "{l:?}");
        c.listeners.retain(|l| l.bind.port() != 7777);
        assert!(links(&c, "192.0.2.1", PortOverrides::default()).is_err());
    }

    #[test]
    fn behind_a_load_balancer_the_published_ports_must_be_given() {
        let mut c = Preset::Whatsapp.config();
        c.listeners.retain(|l| l.accept_proxy);
        c.listeners[0].upstream = vec!["whatsapp.net:443".parse().unwrap()];
        let e = links(&c, "lb.example.org", PortOverrides::default()).unwrap_err();
        assert!(e.contains("--chat-port"), "{e}");
        let l = links(
            &c,
            "lb.example.org",
            PortOverrides {
                chat_port: Some(443),
                media_port: Some(587),
            },
        )
        .unwrap();
        assert_eq!(
            l[0].url,
            "https://wa.me/proxy?host=lb.example.org&chatPort=443&mediaPort=587&chatTLS=1"
        );
    }

    #[test]
    fn hosts_are_checked() {
        for ok in [
            "proxy.example.org",
            "a-b.example",
            "192.0.2.1",
            "2001:db8::1",
            "x.",
        ] {
            validate_host(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "https://proxy.example.org",
            "proxy.example.org:443",
            "proxy example",
            "-bad.example",
            "a..b",
            "300.1.2.3",
            "proxy.example.org/x",
            "ünï.example",
        ] {
            assert!(validate_host(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn qr_outputs_are_produced() {
        let url = "https://signal.tube/#proxy.example.org";
        let text = qr_text(url).unwrap();
        assert!(text.lines().count() > 10 && text.contains('█'), "{text}");
        let png = qr_png(url).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
