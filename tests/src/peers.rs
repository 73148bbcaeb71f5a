//! Real peer programs behind or in front of the relay: nginx serving static files from a temp
//! dir (its own minimal nginx.conf, nothing under /etc or /var touched), and iperf3.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{ChildGuard, TempDir, find_program, tail, wait_listening};

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
        let dir = TempDir::new();
        let p = dir.path();
        let www = p.join("www");
        fs::create_dir_all(&www).unwrap();
        let d = |name: &str| p.join(name).display().to_string();
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
             \x20   default_type application/octet-stream;\n\
             \x20   server {{ listen {addr}; root {www}; }}\n\
             }}\n",
            pid = d("nginx.pid"),
            err = d("err.log"),
            body = d("body"),
            proxy = d("proxy"),
            fastcgi = d("fastcgi"),
            uwsgi = d("uwsgi"),
            scgi = d("scgi"),
            www = www.display(),
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
        let up = wait_listening(addr, Duration::from_secs(10));
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
