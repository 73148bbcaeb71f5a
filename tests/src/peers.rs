//! Real peer programs behind or in front of the relay: nginx serving static files from a temp
//! dir (its own minimal nginx.conf, nothing under /etc or /var touched; optionally with
//! `proxy_protocol` or `ssl` on its listener), HAProxy in front of the relay, OpenSSL as a
//! private CA ([`Pki`]), as a TLS client ([`SClient`]) and as a TLS server ([`SServer`]).

use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::{
    ChildGuard, TempDir, find_program, run_with_timeout, tail, wait_listening, wait_until,
};

/// nginx in the foreground serving `root()` on one address; stopped when dropped.
pub struct Nginx {
    dir: TempDir,
    addr: SocketAddr,
    _guard: ChildGuard,
}

impl Nginx {
    /// Starts nginx on `addr` serving `<its temp dir>/www`; files can be added to `root()`
    /// before or after.
    pub fn start(addr: SocketAddr) -> Nginx {
        Nginx::start_with(addr, "", "")
    }

    /// Like [`Nginx::start`], with `listen_opts` after the listen address (`proxy_protocol`,
    /// `ssl`) and `server_conf` inside the `server { }` block (`ssl_certificate ...;`,
    /// `location / { return 200 "$proxy_protocol_addr\n"; }`).
    pub fn start_with(addr: SocketAddr, listen_opts: &str, server_conf: &str) -> Nginx {
        Nginx::start_http(
            addr,
            "default_type application/octet-stream;",
            &format!("server {{ listen {addr} {listen_opts}; root {{www}}; {server_conf} }}"),
        )
    }

    /// nginx as Debian's package ships it (`/etc/nginx/nginx.conf` and the default site): its
    /// `http` settings (`sendfile`, `tcp_nopush`, `mime.types`, `gzip on`, `server_tokens`
    /// left at its default), a server on `plain` and, with `tls`, on that address with `ssl`
    /// and that certificate, root `root()` with Debian's `index` and `try_files $uri $uri/
    /// =404`. `extra` goes into `http { }` (shorter `client_header_timeout`, say).
    pub fn start_debian(plain: SocketAddr, tls: Option<(SocketAddr, &Leaf)>, extra: &str) -> Nginx {
        let tls = tls
            .map(|(a, leaf)| {
                format!(
                    "listen {a} ssl default_server; ssl_certificate {}; ssl_certificate_key {};",
                    leaf.fullchain.display(),
                    leaf.key.display()
                )
            })
            .unwrap_or_default();
        Nginx::start_http(
            plain,
            &format!(
                "sendfile on; tcp_nopush on; types_hash_max_size 2048; \
                 include /etc/nginx/mime.types; default_type application/octet-stream; \
                 ssl_protocols TLSv1 TLSv1.1 TLSv1.2 TLSv1.3; ssl_prefer_server_ciphers on; \
                 gzip on; {extra}"
            ),
            &format!(
                "server {{ listen {plain} default_server; {tls} root {{www}}; \
                 index index.html index.htm index.nginx-debian.html; server_name _; \
                 location / {{ try_files $uri $uri/ =404; }} }}"
            ),
        )
    }

    /// nginx with `http_conf` and `server` (where `{www}` stands for the document root) in
    /// its `http { }`; `addr` is where it is awaited.
    fn start_http(addr: SocketAddr, http_conf: &str, server: &str) -> Nginx {
        let dir = TempDir::new();
        let p = dir.path();
        let www = p.join("www");
        fs::create_dir_all(&www).unwrap();
        let d = |name: &str| p.join(name).display().to_string();
        let server = server.replace("{www}", &www.display().to_string());
        let conf = format!(
            "daemon off;\n\
             master_process off;\n\
             worker_processes 1;\n\
             pid {pid};\n\
             error_log {err} warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {body};\n\
             \x20   proxy_temp_path {proxy};\n\
             \x20   fastcgi_temp_path {fastcgi};\n\
             \x20   uwsgi_temp_path {uwsgi};\n\
             \x20   scgi_temp_path {scgi};\n\
             \x20   {http_conf}\n\
             \x20   {server}\n\
             }}\n",
            pid = d("nginx.pid"),
            err = d("err.log"),
            body = d("body"),
            proxy = d("proxy"),
            fastcgi = d("fastcgi"),
            uwsgi = d("uwsgi"),
            scgi = d("scgi"),
        );
        let conf_path = p.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let nginx = find_program("nginx").expect("nginx installed");
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(p)
            .arg("-e")
            .arg(p.join("err.log"))
            .arg("-c")
            .arg(&conf_path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut guard = ChildGuard::spawn("nginx", &mut cmd);
        let up = listening(addr, Duration::from_secs(10));
        if !up {
            let status = guard.try_wait();
            let log = fs::read_to_string(p.join("err.log")).unwrap_or_default();
            panic!(
                "nginx not listening on {addr} after 10 s (exit: {status:?}); err.log:\n{}",
                tail(&log, 30)
            );
        }
        Nginx {
            dir,
            addr,
            _guard: guard,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The document root.
    pub fn root(&self) -> PathBuf {
        self.dir.join("www")
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        fs::read_to_string(self.dir.join("err.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Waits up to `timeout` until something listens on `addr`, IPv4 ([`wait_listening`]) or
/// IPv6 (read from /proc/net/tcp6; no connection made).
fn listening(addr: SocketAddr, timeout: Duration) -> bool {
    match addr {
        SocketAddr::V4(_) => wait_listening(addr, timeout),
        SocketAddr::V6(a) => wait_until(timeout, || listening_v6(a)),
    }
}

/// Is there a listening socket on `addr` in /proc/net/tcp6?
fn listening_v6(addr: std::net::SocketAddrV6) -> bool {
    const TCP_LISTEN: &str = "0A";
    let table = fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
            return false;
        };
        let Some((ip_hex, port_hex)) = local.split_once(':') else {
            return false;
        };
        // Four 32-bit words, each printed in host byte order.
        let mut ip = [0u8; 16];
        for (i, chunk) in ip.chunks_mut(4).enumerate() {
            let Some(Ok(word)) = ip_hex
                .get(i * 8..i * 8 + 8)
                .map(|h| u32::from_str_radix(h, 16))
            else {
                return false;
            };
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        *state == TCP_LISTEN
            && u16::from_str_radix(port_hex, 16) == Ok(addr.port())
            && std::net::Ipv6Addr::from(ip) == *addr.ip()
    })
}

// ---------------------------------------------------------------------------------------------
// HAProxy

/// HAProxy in the foreground (`-db`) with `body` (frontends and backends) after a minimal
/// `global`/`defaults` (mode tcp); stopped when dropped.
pub struct Haproxy {
    dir: TempDir,
    _guard: ChildGuard,
}

impl Haproxy {
    /// Starts HAProxy and waits until every address in `binds` listens.
    pub fn start(body: &str, binds: &[SocketAddr]) -> Haproxy {
        let dir = TempDir::new();
        let conf = format!(
            "global\n\
             \x20   maxconn 256\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 30s\n\
             \x20   timeout server 30s\n\
             {body}\n"
        );
        let conf_path = dir.join("haproxy.cfg");
        fs::write(&conf_path, conf).unwrap();
        let log = dir.join("haproxy.log");
        let haproxy = find_program("haproxy").expect("haproxy installed");
        let mut cmd = Command::new(haproxy);
        cmd.arg("-db").arg("-f").arg(&conf_path);
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::create(dir.join("haproxy.err")).unwrap());
        let mut guard = ChildGuard::spawn("haproxy", &mut cmd);
        for &a in binds {
            if !listening(a, Duration::from_secs(10)) {
                let status = guard.try_wait();
                let err = fs::read_to_string(dir.join("haproxy.err")).unwrap_or_default();
                panic!(
                    "haproxy not listening on {a} after 10 s (exit: {status:?}); stderr:\n{}",
                    tail(&err, 30)
                );
            }
        }
        Haproxy { dir, _guard: guard }
    }

    /// What HAProxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("haproxy.err")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// OpenSSL

/// The `openssl` program (panics when missing: gate with `require_program("openssl")`).
pub fn openssl() -> Command {
    Command::new(find_program("openssl").expect("openssl installed"))
}

/// Runs `openssl ARGS` to its end and panics with its output when it fails.
fn openssl_ok(args: &[&str], cwd: &Path) {
    let mut cmd = openssl();
    cmd.args(args).current_dir(cwd);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "openssl {args:?}: {}", out.text());
}

/// Key type of a certificate made by [`Pki`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 (fast to generate).
    Ec,
    /// RSA 2048.
    Rsa2048,
}

impl KeyKind {
    fn args(self) -> &'static [&'static str] {
        match self {
            KeyKind::Ec => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
            KeyKind::Rsa2048 => &["-newkey", "rsa:2048"],
        }
    }
}

/// A certificate signed by a [`Pki`]'s CA, in Let's Encrypt's layout.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The leaf alone (cert.pem).
    pub cert: PathBuf,
    /// The leaf then the CA (fullchain.pem).
    pub fullchain: PathBuf,
    /// Its private key, PKCS#8 PEM (privkey.pem).
    pub key: PathBuf,
}

/// A private CA made with `openssl req -x509` (ECDSA P-256, 2 days) in a temp dir, signing
/// leaf certificates for the tests' TLS servers; removed when dropped.
pub struct Pki {
    dir: TempDir,
    next: AtomicU32,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new();
        let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
        args.extend_from_slice(KeyKind::Ec.args());
        args.extend_from_slice(&[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=sluice-tests CA",
        ]);
        openssl_ok(&args, dir.path());
        Pki {
            dir,
            next: AtomicU32::new(1),
        }
    }

    /// The CA certificate (for `-CAfile`, `--cacert`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A leaf with subject CN `cn` and the SANs `sans` (`DNS:a.test`, `IP:127.0.0.1`),
    /// for serverAuth.
    pub fn leaf(&self, cn: &str, sans: &[&str], kind: KeyKind) -> Leaf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let d = self.dir.path();
        let name = |ext: &str| format!("leaf{n}.{ext}");
        let mut args = vec!["req", "-new", "-nodes"];
        args.extend_from_slice(kind.args());
        let (key, csr, cert, ext) = (name("key"), name("csr"), name("pem"), name("ext"));
        let subj = format!("/CN={cn}");
        args.extend_from_slice(&["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl_ok(&args, d);
        let mut ext_text = String::from(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n",
        );
        if !sans.is_empty() {
            ext_text.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        fs::write(d.join(&ext), ext_text).unwrap();
        let serial = format!("{}", 1000 + n);
        openssl_ok(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &cert,
            ],
            d,
        );
        let fullchain = d.join(name("fullchain.pem"));
        let mut chain = fs::read(d.join(&cert)).unwrap();
        chain.extend_from_slice(&fs::read(self.ca()).unwrap());
        fs::write(&fullchain, chain).unwrap();
        Leaf {
            cert: d.join(cert),
            fullchain,
            key: d.join(key),
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// `openssl s_client -quiet -nocommands ARGS` kept running: bytes go to its stdin, what the
/// server sends comes back on its stdout, byte for byte. Stopped by pid when dropped.
pub struct SClient {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    rx: Receiver<Vec<u8>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    got: Vec<u8>,
}

impl SClient {
    pub fn start(args: &[&str]) -> SClient {
        let mut cmd = openssl();
        cmd.args(["s_client", "-quiet", "-nocommands"]).args(args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = ChildGuard::spawn("openssl s_client", &mut cmd);
        let stdin = guard.child().stdin.take();
        let mut out = guard.child().stdout.take().unwrap();
        let mut err = guard.child().stderr.take().unwrap();
        let (tx, rx) = channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let e = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                e.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        SClient {
            guard,
            stdin,
            rx,
            stderr,
            got: Vec::new(),
        }
    }

    /// Writes `data` to s_client (from a thread, so a large write cannot block on the
    /// server's answer) and reads until `expect_len` bytes came back, or the stream ended, or
    /// `timeout` passed; returns what came back.
    pub fn exchange(&mut self, data: Vec<u8>, expect_len: usize, timeout: Duration) -> Vec<u8> {
        let mut stdin = self.stdin.take().expect("stdin open");
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(&data);
            stdin
        });
        let got = self.read(expect_len, timeout);
        // A writer still blocked (the relay stopped reading) is freed by stopping s_client.
        if !crate::wait_until(Duration::from_secs(5), || writer.is_finished()) {
            self.guard.stop(Duration::from_millis(100));
            let _ = writer.join();
            return got;
        }
        self.stdin = writer.join().ok();
        got
    }

    /// Reads until `n` bytes came back in all (since the last read), the stream ended, or
    /// `timeout` passed.
    pub fn read(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        self.read_until(timeout, |got| got.len() >= n)
    }

    /// Reads until `done(what came back since the last read)`, the stream ended, or `timeout`
    /// passed.
    pub fn read_until(&mut self, timeout: Duration, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        while !done(&self.got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.got.extend_from_slice(&chunk),
                Err(_) => break,
            }
        }
        std::mem::take(&mut self.got)
    }

    /// Writes `data` to s_client's stdin (it must fit in the pipe, 64 KB, unless the server
    /// reads it as it comes without answering).
    pub fn send(&mut self, data: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(data).expect("write to s_client");
        w.flush().unwrap();
    }

    /// Waits up to `timeout` for s_client to exit (the server closed); its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.guard.wait_timeout(timeout)
    }

    /// What s_client printed on stderr so far (verification, errors).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

/// `openssl s_server -WWW` on `addr` with `leaf`: serves the files given to
/// [`SServer::start_www`] (`GET /NAME HTTP/1.0`) and closes each connection after the answer.
/// Connections are handled one at a time. Stopped by pid when dropped.
pub struct SServer {
    dir: TempDir,
    addr: SocketAddr,
    _guard: ChildGuard,
}

impl SServer {
    pub fn start_www(addr: SocketAddr, leaf: &Leaf, files: &[(&str, &[u8])]) -> SServer {
        let dir = TempDir::new();
        for (name, body) in files {
            fs::write(dir.join(name), body).unwrap();
        }
        let mut cmd = openssl();
        cmd.arg("s_server")
            .arg("-accept")
            .arg(addr.to_string())
            .arg("-cert")
            .arg(&leaf.cert)
            .arg("-key")
            .arg(&leaf.key)
            .args(["-WWW", "-quiet"])
            .current_dir(dir.path());
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("s_server.out")).unwrap())
            .stderr(fs::File::create(dir.join("s_server.err")).unwrap());
        let mut guard = ChildGuard::spawn("openssl s_server", &mut cmd);
        if !listening(addr, Duration::from_secs(10)) {
            let status = guard.try_wait();
            panic!(
                "openssl s_server not listening on {addr} (exit: {status:?}); stderr:\n{}",
                fs::read_to_string(dir.join("s_server.err")).unwrap_or_default()
            );
        }
        SServer {
            dir,
            addr,
            _guard: guard,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What s_server printed so far.
    pub fn log(&self) -> String {
        let out = fs::read_to_string(self.dir.join("s_server.out")).unwrap_or_default();
        let err = fs::read_to_string(self.dir.join("s_server.err")).unwrap_or_default();
        format!("{out}{err}")
    }
}
