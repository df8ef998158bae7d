//! Real test servers on 127.0.0.1 (moto's S3 server, RangeHTTPServer, Python's http.server),
//! installed by scripts/setup into .test-servers; shared by remote/tests and tools/tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, killed when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn servers_dir() -> PathBuf {
    std::env::var_os("MOTLEY_TEST_SERVERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.test-servers"))
}

/// A port nothing listens on, never the same twice in this process: the OS may hand a port
/// just released to the next bind(0), and two tests' servers on one port would answer each
/// other's requests until one is killed (a "connection reset" in the other test).
pub fn free_port() -> anyhow::Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    anyhow::bail!("no fresh port in 100 tries")
}

pub fn start(args: &[&str], cwd: &Path) -> anyhow::Result<Server> {
    start_on(args, cwd, free_port()?)
}

/// [`start`] on a given port (a server restarted where its clients expect it).
pub fn start_on(args: &[&str], cwd: &Path, port: u16) -> anyhow::Result<Server> {
    let dir = servers_dir();
    anyhow::ensure!(dir.join(".motley-done").is_file(), "{} missing: run scripts/setup", dir.display());
    let mut cmd = Command::new(std::env::var("MOTLEY_TEST_PYTHON").unwrap_or_else(|_| "python3".into()));
    cmd.args(args.iter().map(|a| a.replace("{port}", &port.to_string())))
        .current_dir(cwd)
        .env("PYTHONPATH", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn()?;
    let server = Server { child, port };
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "server {args:?} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// Client options that reach a moto server on `port` (test credentials, plain HTTP).
pub fn s3_options(port: u16) -> motley_remote::RemoteOptions {
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    motley_remote::RemoteOptions {
        config: vec![
            kv("aws_endpoint", &format!("http://127.0.0.1:{port}")),
            kv("aws_access_key_id", "test"),
            kv("aws_secret_access_key", "test"),
            kv("aws_region", "us-east-1"),
            kv("aws_allow_http", "true"),
        ],
        ..Default::default()
    }
}

pub fn moto() -> anyhow::Result<Server> {
    start(&["-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"], Path::new("."))
}

/// Creates a bucket with a plain HTTP request (moto accepts it unsigned).
pub fn create_bucket(port: u16, name: &str) -> anyhow::Result<()> {
    // A server that has just started may still drop a first connection on a loaded machine;
    // creating a bucket twice is harmless.
    let mut tries = 0;
    loop {
        match put_bucket(port, name) {
            Err(e) if tries < 4 && e.downcast_ref::<std::io::Error>().is_some() => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(250 * tries));
            }
            r => return r,
        }
    }
}

fn put_bucket(port: u16, name: &str) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    anyhow::ensure!(resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"), "create bucket: {resp}");
    Ok(())
}
